"""Attention processor for a fused (merged-QKV) Qwen-Image block."""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .kernels import fused_qkv, joint_qkv, qkv_epilogue, rope_tables
from .lora_factors import has_hooks, linear_lora_factors


def stream_rope(freqs):
    """One stream's RoPE, as handed to a block: complex freqs, or tables from the pos_embed hook."""
    if freqs is None:
        return None, None
    if torch.is_complex(freqs):
        return rope_tables(freqs)
    # [S, 2, D//2] real tables from the hook: row views with unit inner stride, so the kernel runs the same
    # variant as on separate contiguous tables (what the op benchmark times)
    return freqs[:, 0], freqs[:, 1]


def pos_embed_hook(module, args, output):
    """Forward hook on `transformer.pos_embed`: complex freqs -> real `[S, 2, D//2]` (cos, sin) once per forward,
    one tensor per stream with the sequence first (context parallel splits dim 0)."""
    return tuple(torch.stack(rope_tables(f), dim=1) if torch.is_complex(f) else f for f in output)


def _stream(proj, x, norm_q, norm_k, cos, sin, heads):
    """One stream's arguments for `joint_qkv`: the kernel's (weights, LoRA factors) where they are exactly what the
    modules compute; otherwise `y` from the projection's own forward, for the epilogue alone."""
    nq, nk = _weight(norm_q), _weight(norm_k)
    hooked_norms = has_hooks(norm_q) or has_hooks(norm_k)
    factors = None if hooked_norms else linear_lora_factors(proj)
    if factors is None:
        # not expressible as W + s B A (dropout, DoRA, hooks, other wrappers): run the module as peft would
        y = proj(x)
        if hooked_norms:  # group offloading or other hooks on the norms: they too run as their own modules
            y, nq, nk = _normed_by_modules(y, norm_q, norm_k, heads), None, None
        return dict(y=y, norm_q=nq, norm_k=nk, cos=cos, sin=sin)
    w, b, lora_a, lora_b, lora_scale = factors
    return dict(x=x, weight=w, bias=b, norm_q=nq, norm_k=nk, cos=cos, sin=sin, lora_a=lora_a, lora_b=lora_b,
                lora_scale=lora_scale)


def _normed_by_modules(y, norm_q, norm_k, heads):
    """`y` [B, S, 3 H D] with q and k put through their norm modules (the stock processor's calls)."""
    q, k, v = y.unflatten(-1, (3, heads, -1)).unbind(-3)
    q = norm_q(q) if norm_q is not None else q
    k = norm_k(k) if norm_k is not None else k
    return torch.stack([q, k, v], dim=-3).flatten(-3)


def _joint_qkv(txt, img, *, heads, eps):
    """`joint_qkv`, except that a stream `_stream` could not express (key `y`) gets the epilogue only."""
    if "y" not in txt and "y" not in img:
        return joint_qkv(txt, img, heads=heads, eps=eps)
    outs = []
    for s in (txt, img):
        if "y" in s:
            outs.append(qkv_epilogue(s["y"], heads=heads, norm_q=s["norm_q"], norm_k=s["norm_k"], cos=s["cos"],
                                     sin=s["sin"], eps=eps))
        else:
            outs.append(fused_qkv(s["x"], s["weight"], s["bias"], heads=heads, norm_q=s["norm_q"],
                                  norm_k=s["norm_k"], cos=s["cos"], sin=s["sin"], eps=eps, lora_a=s["lora_a"],
                                  lora_b=s["lora_b"], lora_scale=s["lora_scale"]))
    return tuple(torch.cat([t, i], dim=1) for t, i in zip(*outs))


class FusedQwenAttnProcessor:
    """Drop-in for diffusers' `QwenDoubleStreamAttnProcessor2_0` on a block fused by `qwen_fused.fuse_qkv`.

    Both streams' q/k/v come from one `joint_qkv` call (merged projection, LoRA, QK RMSNorm and RoPE in one
    epilogue, written straight into the joint [text; image] layout); the rest is the stock processor's:
    the text padding mask, `dispatch_attention_fn` with this processor's attention backend and parallel
    config, `to_out` and `to_add_out`.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        img_out, txt_out = self.attention(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                          attention_mask, image_rotary_emb)
        img_out = attn.to_out[0](img_out)
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out)
        return img_out, txt_out

    def attention(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                  attention_mask=None, image_rotary_emb=None):
        """Everything before the output projections: `(img_out, txt_out)`, contiguous `[B, S, H * D]` per stream.

        The fused block forward (`qwen_fused.block`) calls this and applies `to_out[0]` / `to_add_out` itself, with
        the gate and residual in the same op (`block_ops.linear_gate_residual`).
        """
        if encoder_hidden_states is None:
            raise ValueError("FusedQwenAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "FusedQwenAttnProcessor does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]

        seq_txt = encoder_hidden_states.shape[1]
        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        heads = attn.heads
        eps = attn.norm_q.eps if attn.norm_q is not None else 1e-6
        txt = _stream(attn.add_qkv_proj, encoder_hidden_states, attn.norm_added_q, attn.norm_added_k,
                      *stream_rope(txt_freqs), heads)
        img = _stream(attn.to_qkv, hidden_states, attn.norm_q, attn.norm_k, *stream_rope(img_freqs), heads)
        query, key, value = _joint_qkv(txt, img, heads=heads, eps=eps)

        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        return out[:, seq_txt:].contiguous(), out[:, :seq_txt].contiguous()


def _weight(norm):
    return None if norm is None else norm.weight
