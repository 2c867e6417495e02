"""Qwen-Image, -Edit, -Edit-2509, -Edit-2511: diffusers' `QwenImageTransformer2DModel` (double-stream blocks).

The fused processor is `qwen_fused.processor.FusedQwenAttnProcessor`; its RoPE tables come from a hook on
`pos_embed` that converts the complex freqs of both streams once per forward.
"""
from __future__ import annotations

from ..names import STOCK_ORDER as _STOCK_ORDER
from ..names import STREAMS as _STREAMS
from ..processor import FusedQwenAttnProcessor, pos_embed_hook

NAME = "qwenimage"
STREAMS = _STREAMS
STOCK_ORDER = _STOCK_ORDER
NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
# the training default on a fused model (qwen_fused/train_lora.py holds the same list as DEFAULT_TARGETS)
LORA_TARGETS = ("to_qkv", "add_qkv_proj", "to_out.0", "to_add_out", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2",
                "txt_mod.1")
LAYERS, HEADS, HEAD_DIM = 60, 24, 128
WIDTH = HEADS * HEAD_DIM
# fuse_qkv puts this forward hook on `pos_embed` (the fused processors read real RoPE tables)
POS_EMBED_HOOK = pos_embed_hook


def model_class():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel


def meta_model():
    """A one-block transformer on the meta device: its module names (kohya keys are mapped back with them)."""
    import torch

    with torch.device("meta"):
        return model_class()(num_layers=1, num_attention_heads=1, attention_head_dim=16, joint_attention_dim=16,
                             in_channels=16, axes_dims_rope=(4, 6, 6))


def attentions(model):
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]


def processors():
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    return {QwenDoubleStreamAttnProcessor2_0: FusedQwenAttnProcessor}


def default_stock_processor():
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    return QwenDoubleStreamAttnProcessor2_0
