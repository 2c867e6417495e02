"""Opt-in merged SwiGLU for Qwen-Image 2.1 (issue 20, item 3): each block's `img_mlp.gate_layer` and
`img_mlp.proj` become one `img_mlp.gate_up` Linear (`weight = cat([gate_layer, proj])`, gate rows first, as
ComfyUI's merged `gate_up` is), run as one GEMM with the gate applied after it (`kernels.swiglu`).

Off by default, like `fuse_blocks`, until a GPU measures it. Independent of `fuse_qkv` (either order). The state
dict changes (`img_mlp.gate_up.weight` for the two), so save checkpoints from an unfused model; `unfuse_swiglu`
restores the stock modules bit for bit. LoRA: a peft adapter on `gate_up` runs inside the op. Like `fuse_qkv`,
`fuse_swiglu` binds diffusers' LoRA API on the model (qwen_fused/bindings.py), so `qwen_fused.load_lora` /
`add_lora`, `transformer.add_adapter` / `load_lora_adapter` / `save_lora_adapter` and `pipe.load_lora_weights` /
`save_lora_weights` map LoRA names `gate_layer` / `proj` onto it exactly (two parts, block-diagonal B kept so while
training, each part initialised as stock peft initialises it) and save them under the stock names; `load_lora` also
maps `gate_up` LoRAs back onto an unfused model.
This module sits above `fuse.py` in the fusing layer (it reuses its exact merge and split).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import bindings
from ..fuse import _merged_linear, _peft_layers, _split_linear
from ..kernels.swiglu import swiglu
from ..lora_factors import linear_lora_factors
from . import qwenimage21, transformer_and_family

# row order of gate_up: the gate (SiLU on it) first, then the up projection (qwenimage21.MERGED_LINEARS)
PARTS = tuple(p.rsplit(".", 1)[1] for p in qwenimage21.MERGED_LINEARS["img_mlp.gate_up"][0])


class MergedSwiGLU(nn.Module):
    """`QwenImage21SwiGLUFeedForward` with `gate_layer` and `proj` as one `gate_up`: `out(silu(g) * u)`."""

    # the stock module's children in its registration order (what peft walks, and so the order in which stock peft
    # draws LoRA inits): the LoRA layer lists the stock modules in this order (lora/adapters.py: stock_modules)
    STOCK_CHILDREN = ("proj", "out", "gate_layer", "activation_fn")

    def __init__(self, gate_up: nn.Module, out: nn.Module):
        super().__init__()
        self.gate_up = gate_up
        self.out = out

    def forward(self, hidden_states):
        factors = linear_lora_factors(self.gate_up)
        if factors is None:  # not expressible as W + s B A (dropout, DoRA, hooks): the module runs itself
            gate, up = self.gate_up(hidden_states).chunk(2, dim=-1)
            return self.out(F.silu(gate) * up)
        weight, bias, lora_a, lora_b, lora_scale = factors
        return self.out(swiglu(hidden_states, weight, bias, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale))


def _blocks(model_or_pipeline):
    model, family = transformer_and_family(model_or_pipeline)
    if family is not qwenimage21:
        raise TypeError(f"the merged SwiGLU is for Qwen-Image 2.1 (QwenImage21Transformer2DModel); got "
                        f"{type(model).__name__}")
    return model, [(f"transformer_blocks.{i}.img_mlp", b) for i, b in enumerate(model.transformer_blocks)]


def is_swiglu_fused(model_or_pipeline) -> bool:
    """True when every block's MLP is a `MergedSwiGLU`."""
    _, blocks = _blocks(model_or_pipeline)
    return bool(blocks) and all(isinstance(b.img_mlp, MergedSwiGLU) for _, b in blocks)


def fuse_swiglu(model_or_pipeline):
    """Merge each block's `img_mlp.gate_layer` + `img_mlp.proj` into `img_mlp.gate_up`, in place; returns the
    transformer. Keeps device, dtype and requires_grad; works on meta-device models."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21SwiGLUFeedForward

    model, blocks = _blocks(model_or_pipeline)
    for name, block in blocks:  # validate everything before changing anything
        mlp = block.img_mlp
        if isinstance(mlp, MergedSwiGLU):
            raise ValueError(f"{name} is already merged; call unfuse_swiglu first")
        if type(mlp) is not QwenImage21SwiGLUFeedForward or type(mlp.activation_fn) is not nn.SiLU:
            raise TypeError(f"{name} is a {type(mlp).__name__}; fuse_swiglu merges QwenImage21SwiGLUFeedForward")
        peft = _peft_layers(mlp, PARTS)
        if peft:
            raise ValueError(f"{name}.{peft[0]} carries a peft LoRA adapter; fuse_swiglu before adding adapters")
        hooked = [p for p in (mlp, *(getattr(mlp, n) for n in PARTS))
                  if hasattr(p, "_hf_hook") or hasattr(p, "_diffusers_hook") or p._forward_hooks
                  or p._forward_pre_hooks]
        if hooked:
            # the merged module would run without them (offload, layerwise casting)
            raise ValueError(f"{name} carries accelerate/diffusers hooks; call fuse_swiglu before enabling them")
    bindings.require()  # diffusers' LoRA API must map gate_layer/proj onto gate_up, as fuse_qkv's q/k/v
    for _, block in blocks:
        mlp = block.img_mlp
        block.img_mlp = MergedSwiGLU(_merged_linear([getattr(mlp, n) for n in PARTS]), mlp.out)
    bindings.bind(model)
    return model


def unfuse_swiglu(model_or_pipeline):
    """Exact inverse of `fuse_swiglu`: the stock `QwenImage21SwiGLUFeedForward`, same state dict keys, order and
    bits; returns the transformer."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21SwiGLUFeedForward

    model, blocks = _blocks(model_or_pipeline)
    if not any(isinstance(b.img_mlp, MergedSwiGLU) for _, b in blocks):
        raise ValueError("the MLPs of this transformer are not merged; nothing to unfuse")
    for name, block in blocks:
        if isinstance(block.img_mlp, MergedSwiGLU) and _peft_layers(block.img_mlp, ("gate_up",)):
            raise ValueError(f"{name}.gate_up carries a peft adapter; unload it before unfuse_swiglu")
    for _, block in blocks:
        merged = block.img_mlp
        if not isinstance(merged, MergedSwiGLU):
            continue
        gate, up = _split_linear(merged.gate_up, 2)
        with torch.device("meta"):  # the stock module's own registration order (MergedSwiGLU.STOCK_CHILDREN)
            mlp = QwenImage21SwiGLUFeedForward(gate.in_features, gate.out_features)
        mlp.proj, mlp.out, mlp.gate_layer = up, merged.out, gate
        block.img_mlp = mlp
    bindings.unbind(model)  # (the binder keeps diffusers' LoRA API bound while a to_qkv remains)
    return model
