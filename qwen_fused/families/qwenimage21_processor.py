"""Attention processors for a fused (merged `to_qkv`) Qwen-Image 2.1 block.

Each fused processor subclasses the stock processor it replaces, because the model decides what to build by
`isinstance` on its processors: a flex `BlockMask` when some processor is a `QwenImage21FlexAttnProcessor`,
prefill `segments` unless all are. A processor of another class would get neither and compute full attention,
with no error.

Only the projection differs from stock: q, k, v come from one `fused_qkv` call (merged projection, LoRA, QK
RMSNorm and RoPE in one epilogue). Everything after it is the stock `__call__` itself, run on `_Projected`, a
view of the attention module whose `to_q/k/v` hand back the fused op's results (see there).
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
)

from ..kernels import fused_qkv, qkv_epilogue
from ..lora_factors import has_hooks, linear_lora_factors
from ..processor import _normed_by_modules, stream_rope


def fused_qkv_21(attn, hidden_states, rotary_emb):
    """q, k, v `[B, S, heads, D]` of a fused 2.1 attention: `_qwenimage21_prepare_qkv` before its KV cache.

    The projection goes to the kernel as (weight, LoRA factors) where those are exactly what the module computes;
    otherwise (dropout, DoRA, hooks) the module runs itself and only the epilogue is fused."""
    # heads from the projection's rows and head_dim, as stock splits (it never trusts attn.heads for the width)
    head_dim = attn.inner_dim // attn.heads
    cos, sin = stream_rope(rotary_emb)
    norm_q, norm_k = attn.norm_q, attn.norm_k
    hooked_norms = has_hooks(norm_q) or has_hooks(norm_k)
    factors = None if hooked_norms else linear_lora_factors(attn.to_qkv)
    if factors is not None:
        weight, bias, lora_a, lora_b, lora_scale = factors
        return fused_qkv(hidden_states, weight, bias, heads=weight.shape[0] // (3 * head_dim), norm_q=norm_q.weight,
                         norm_k=norm_k.weight, cos=cos, sin=sin, eps=norm_q.eps, lora_a=lora_a, lora_b=lora_b,
                         lora_scale=lora_scale)
    y = attn.to_qkv(hidden_states)
    heads = y.shape[-1] // (3 * head_dim)
    nq, nk = norm_q.weight, norm_k.weight
    if hooked_norms:  # group offloading or other hooks on the norms: they run as their own modules
        y, nq, nk = _normed_by_modules(y, norm_q, norm_k, heads), None, None
    return qkv_epilogue(y, heads=heads, norm_q=nq, norm_k=nk, cos=cos, sin=sin, eps=norm_q.eps)


def _identity(t):
    return t


class _Projected:
    """What the stock processor reads of its attention module, with q, k, v already computed.

    The stock `__call__` runs on this unchanged: `to_q/k/v` return the fused op's q, k, v (already normalised and
    rotated; flattened as a Linear's output would be, a view), the norms are the identity and the caller passes
    no RoPE. So every line after the projection is diffusers' own: the prefix KV cache in both modes, the segments
    and `key_valid`, the flex `BlockMask` path, `set_attention_backend` and the parallel config.
    """

    __slots__ = ("to_q", "to_k", "to_v", "to_out", "heads", "inner_dim")
    norm_q = norm_k = staticmethod(_identity)

    def __init__(self, attn, q, k, v):
        self.to_q, self.to_k, self.to_v = (lambda _x, t=t: t.flatten(2) for t in (q, k, v))
        self.to_out, self.heads, self.inner_dim = attn.to_out, attn.heads, attn.inner_dim


class _Fused:
    def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, layer_cache=None,
                 kv_cache_mode=None, cache_write_slice=None, segments=None, key_valid=None):
        q, k, v = fused_qkv_21(attn, hidden_states, rotary_emb)
        return super().__call__(_Projected(attn, q, k, v), hidden_states, attention_mask=attention_mask,
                                rotary_emb=None, layer_cache=layer_cache, kv_cache_mode=kv_cache_mode,
                                cache_write_slice=cache_write_slice, segments=segments, key_valid=key_valid)


class FusedQwenImage21AttnProcessor(_Fused, QwenImage21AttnProcessor):
    """Drop-in for diffusers' `QwenImage21AttnProcessor` (segmented SDPA prefill) on a block fused by
    `qwen_fused.fuse_qkv`."""


class FusedQwenImage21FlexAttnProcessor(_Fused, QwenImage21FlexAttnProcessor):
    """Drop-in for diffusers' `QwenImage21FlexAttnProcessor` (one flex-attention prefill with a `BlockMask`) on a
    block fused by `qwen_fused.fuse_qkv`."""
