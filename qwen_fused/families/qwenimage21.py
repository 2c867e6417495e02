"""Qwen-Image 2.1: diffusers' `QwenImage21Transformer2DModel` (32 single-stream blocks, 4096 = 32 heads x 128,
no biases). One stream per block: `to_q/k/v` -> `to_qkv`; both stock processors have a fused counterpart
(qwenimage21_processor.py); the joint sequence's RoPE tables come from a hook on `pos_embed`.

diffusers before 0.42 has no Qwen-Image 2.1: then `model_class()` is None and nothing here imports the 2.1 module
(the processors load in `processors()`), so Qwen-Image keeps working.
"""
from __future__ import annotations

import torch

from ..kernels import rope_tables

NAME = "qwenimage21"
STREAMS = {"to_qkv": ("to_q", "to_k", "to_v")}
STOCK_ORDER = STREAMS  # QwenImage21Attention registers to_q, to_k, to_v in that order
NORMS = ("norm_q", "norm_k")
# opt-in merged projections beyond STREAMS (qwenimage21_mlp.fuse_swiglu), as the LoRA layer's row splits: merged ->
# (parts in row order, the order the stock module registers them). The released checkpoints and ComfyUI store
# the MLP this way, so LoRAs with `img_mlp.gate_up` keys exist; the LoRA layer maps them both ways.
MERGED_LINEARS = {"img_mlp.gate_up": (("img_mlp.gate_layer", "img_mlp.proj"), ("img_mlp.proj", "img_mlp.gate_layer"))}
LORA_TARGETS = ("to_qkv", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")
LAYERS, HEADS, HEAD_DIM = 32, 32, 128
WIDTH = HEADS * HEAD_DIM
# the real model's latent channels (64-channel VAE, unpatched) and text-encoder width (Qwen3-VL), for check and bench
IN_CHANNELS, CONTEXT_DIM = 64, 4096


def pos_embed_hook(module, args, output):
    """Forward hook on a 2.1 `transformer.pos_embed`: the joint sequence's complex freqs `[S, D/2]` -> real
    `[S, 2, D/2]` (cos, sin), once per forward instead of once per block. Sequence first, so the model's own
    slicing of the prefix (`rotary_emb[prefix_len:]`, KV-cache decode) works on it unchanged."""
    return torch.stack(rope_tables(output), dim=1) if torch.is_complex(output) else output


# fuse_qkv puts this forward hook on `pos_embed` (the fused processors read real RoPE tables)
POS_EMBED_HOOK = pos_embed_hook


def model_class():
    try:
        from diffusers import QwenImage21Transformer2DModel
    except ImportError:  # diffusers < 0.42
        return None
    return QwenImage21Transformer2DModel


def meta_model():
    """A one-block 2.1 transformer on the meta device: its module names (kohya keys are mapped back with them)."""
    with torch.device("meta"):
        return model_class()(num_layers=1, num_attention_heads=1, attention_head_dim=16, context_in_dim=16,
                             in_channels=16, out_channels=16, axes_dims_rope=(4, 6, 6))


def attentions(model):
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]


def processors():
    from diffusers.models.transformers.transformer_qwenimage21 import (
        QwenImage21AttnProcessor,
        QwenImage21FlexAttnProcessor,
    )

    from .qwenimage21_processor import FusedQwenImage21AttnProcessor, FusedQwenImage21FlexAttnProcessor

    return {QwenImage21AttnProcessor: FusedQwenImage21AttnProcessor,
            QwenImage21FlexAttnProcessor: FusedQwenImage21FlexAttnProcessor}


def default_stock_processor():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Attention

    return QwenImage21Attention._default_processor_cls
