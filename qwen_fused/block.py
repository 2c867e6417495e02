"""Opt-in fused forward for the blocks of a model fused by `qwen_fused.fuse_qkv` (off by default).

`fuse_blocks` sets an instance-level `forward` on every `QwenImageTransformerBlock`; the class is untouched, so
diffusers' `compile_repeated_blocks` (it matches blocks by class name) and `_gradient_checkpointing_func(block, ...)`
still find and call the blocks: `nn.Module.__call__` (and the compiled `_call_impl`) calls `self.forward`, which
is the instance attribute. No parameter or buffer changes, so state dicts and saving are as before.

The fused forward computes what the stock block forward computes, with the block-level ops of
`qwen_fused.kernels.block_ops`: LayerNorm + modulation in one op, the output projections (`to_out[0]`,
`to_add_out`, the MLP's `net[2]`) with gate and residual applied in one pass after the GEMM (the LoRA added inside
it), the MLP's up projection with its GELU. Modules whose output it cannot reproduce exactly (hooks, dropout in
training, DoRA, other wrappers) run as themselves with stock's expression, and a call it cannot express at all runs
the stock forward.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .fuse import is_fused, transformer_of
from .kernels.block_ops import linear_gate_residual, linear_gelu, modulated_layernorm
from .lora_factors import has_hooks, linear_lora_factors
from .processor import FusedQwenAttnProcessor


def _blocks(model):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    return [m for m in model.modules() if isinstance(m, QwenImageTransformerBlock)]


def _is_ours(block) -> bool:
    return getattr(vars(block).get("forward"), "__func__", None) is fused_block_forward


def is_blocks_fused(model_or_pipeline) -> bool:
    """True when every block of the transformer runs the fused block forward."""
    blocks = _blocks(transformer_of(model_or_pipeline))
    return bool(blocks) and all(_is_ours(b) for b in blocks)


def fuse_blocks(model_or_pipeline):
    """Give every block of a `fuse_qkv`-fused transformer the fused block forward, in place; returns it."""
    model = transformer_of(model_or_pipeline)
    if not is_fused(model):
        raise ValueError("fuse_blocks needs a transformer fused by qwen_fused.fuse_qkv first (merged to_qkv "
                         "projections and the fused attention processor)")
    blocks = _blocks(model)
    if not blocks:  # a fused Qwen-Image 2.1 model: its single-stream blocks have no fused forward (yet)
        raise TypeError(f"fuse_blocks fuses Qwen-Image's double-stream blocks; {type(model).__name__} has none")
    if any(_is_ours(b) for b in blocks):
        raise ValueError("the blocks of this transformer are already fused; call unfuse_blocks first")
    wrapped = [b for b in blocks if "forward" in vars(b)]
    if wrapped:
        # diffusers' hooks (caching, group offloading, context parallel) and accelerate's wrap the instance
        # forward: replacing it would drop them silently
        raise ValueError("a transformer block already has its forward wrapped (diffusers or accelerate hooks); "
                         "call fuse_blocks before enabling them")
    for block in blocks:
        block.forward = types.MethodType(fused_block_forward, block)
    return model


def unfuse_blocks(model_or_pipeline):
    """Exact inverse of `fuse_blocks`: the blocks run the stock forward again; returns the transformer."""
    model = transformer_of(model_or_pipeline)
    blocks = _blocks(model)
    if not any(_is_ours(b) for b in blocks):
        raise ValueError("the blocks of this transformer are not fused; nothing to unfuse")
    wrapped = [b for b in blocks if not _is_ours(b)]
    if wrapped:
        raise ValueError("a transformer block's forward was wrapped after fuse_blocks (diffusers or accelerate "
                         "hooks); remove those hooks before unfuse_blocks")
    for block in blocks:
        del block.forward
    return model


def _plain_layernorm(norm) -> bool:
    return type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None and not has_hooks(norm)


def _expressible(block, joint_attention_kwargs, modulate_index) -> bool:
    """Whether the fused forward computes exactly what the stock forward would for this call."""
    attn = block.attn
    return (modulate_index is None and not block.zero_cond_t  # per-token modulation (-2511): stock only
            # stock passes these through Attention.forward's filtering to whatever processor is set
            and not joint_attention_kwargs
            and type(attn.processor) is FusedQwenAttnProcessor and not has_hooks(attn)
            and all(_plain_layernorm(n) for n in (block.img_norm1, block.txt_norm1, block.img_norm2, block.txt_norm2)))


def _identity(module) -> bool:
    """A module that returns its input unchanged (dropout in eval mode or with p = 0), or no module."""
    return module is None or (type(module) is nn.Dropout and (module.p == 0 or not module.training)
                              and not has_hooks(module))


def _gated_proj(proj, x, gate, residual, after=None):
    """`residual + gate * after(proj(x))`: one fused op when `proj` is W + s B A and `after` the identity, else
    the modules themselves with stock's expression."""
    factors = linear_lora_factors(proj) if _identity(after) else None
    if factors is None:
        y = proj(x)
        return residual + gate.unsqueeze(1) * (y if after is None else after(y))
    weight, bias, lora_a, lora_b, lora_scale = factors
    return linear_gate_residual(x, weight, bias, gate, residual, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale)


def _gated_mlp(ff, x, gate, residual):
    """`residual + gate * ff(x)` for diffusers' FeedForward (GELU-tanh up, dropout, down)."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    net = ff.net
    if type(ff) is not FeedForward or has_hooks(ff) or len(net) != 3 or not _identity(net[1]):
        return residual + gate.unsqueeze(1) * ff(x)
    up = net[0]
    if (type(up) is GELU and up.approximate == "tanh" and not has_hooks(up) and type(up.proj) is nn.Linear
            and not has_hooks(up.proj)):
        h = linear_gelu(x, up.proj.weight, up.proj.bias)
    else:  # a LoRA or hooks on the up projection: the module itself
        h = up(x)
    return _gated_proj(net[2], h, gate, residual)


def fused_block_forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                        image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
    """`QwenImageTransformerBlock.forward` (same signature and result) with the block-level fused ops."""
    if not _expressible(self, joint_attention_kwargs, modulate_index):
        return type(self).forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                  image_rotary_emb, joint_attention_kwargs, modulate_index)
    img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
    txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
    img_shift1, img_scale1, img_gate1 = img_mod1.chunk(3, dim=-1)
    txt_shift1, txt_scale1, txt_gate1 = txt_mod1.chunk(3, dim=-1)
    img_shift2, img_scale2, img_gate2 = img_mod2.chunk(3, dim=-1)
    txt_shift2, txt_scale2, txt_gate2 = txt_mod2.chunk(3, dim=-1)

    attn = self.attn
    img_attn, txt_attn = attn.processor.attention(
        attn,
        modulated_layernorm(hidden_states, img_shift1, img_scale1, eps=self.img_norm1.eps),
        modulated_layernorm(encoder_hidden_states, txt_shift1, txt_scale1, eps=self.txt_norm1.eps),
        encoder_hidden_states_mask=encoder_hidden_states_mask, image_rotary_emb=image_rotary_emb,
    )
    # modules in stock's call order (to_out, to_add_out, image MLP, text MLP): random dropout draws match stock
    hidden_states = _gated_proj(attn.to_out[0], img_attn, img_gate1, hidden_states,
                                after=attn.to_out[1] if len(attn.to_out) > 1 else None)
    encoder_hidden_states = _gated_proj(attn.to_add_out, txt_attn, txt_gate1, encoder_hidden_states)

    hidden_states = _gated_mlp(
        self.img_mlp, modulated_layernorm(hidden_states, img_shift2, img_scale2, eps=self.img_norm2.eps),
        img_gate2, hidden_states)
    encoder_hidden_states = _gated_mlp(
        self.txt_mlp, modulated_layernorm(encoder_hidden_states, txt_shift2, txt_scale2, eps=self.txt_norm2.eps),
        txt_gate2, encoder_hidden_states)

    # stock clips fp16 to its finite range
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states
