"""Merged QKV projection with LoRA, QK RMSNorm and interleaved RoPE.

    fused_qkv(x, weight, bias=None, *, heads, norm_q=None, norm_k=None, cos=None, sin=None, eps=1e-6,
              lora_a=None, lora_b=None, lora_scale=1.0) -> (q, k, v)

    x        [B, S, C]
    weight   [3 * heads * D, C]          rows: Wq, Wk, Wv
    bias     [3 * heads * D]             or None
    norm_q/k [D]                         RMSNorm weights (None: no norm on that tensor)
    cos/sin  [S, D // 2] float32         angle of pair i at position s (None: no RoPE)
    lora_a   [r, C], lora_b [3 * heads * D, r]
    q, k, v  [B, S, heads, D] in x.dtype

    y = x W^T + b + lora_scale * (x A^T) B^T
    q, k, v = y split in three, then per head; q and k RMS-normalised over D (fp32) with their weights,
    then (t[2i], t[2i+1]) rotated by (cos[s, i], sin[s, i]).

The epilogue runs in fp32 and rounds once to x.dtype (stock diffusers rounds after the GEMM, after the
norm, after the norm weight and after RoPE; see design.md section 1).

`joint_qkv` is the model-level op: both streams of a Qwen-Image block in, q/k/v of the joint
[text; image] sequence out, each `[B, S_txt + S_img, heads, D]` contiguous.

Example::

    q, k, v = fused_qkv(x, w, b, heads=24, norm_q=nq, norm_k=nk, cos=cos, sin=sin)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_qkv", "joint_qkv", "rope_tables", "fused_qkv_torch", "check_inputs"]


def rope_tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' complex RoPE freqs `[S, D // 2]` -> contiguous float32 `(cos, sin)`, each `[S, D // 2]`.

    Call once per forward (the model's pos_embed output), not once per block.
    """
    if not torch.is_complex(freqs):
        raise TypeError(f"rope_tables expects complex freqs [S, D//2], got dtype {freqs.dtype}")
    if freqs.dim() != 2:
        raise ValueError(f"rope_tables expects freqs of shape [S, D//2], got {tuple(freqs.shape)}")
    real = torch.view_as_real(freqs.to(torch.complex64))
    return real[..., 0].contiguous(), real[..., 1].contiguous()


def check_inputs(x, weight, bias, heads, norm_q, norm_k, cos, sin, lora_a, lora_b) -> int:
    """Validate the fused_qkv contract; returns head_dim D. Errors name the argument and both shapes."""
    if x.dim() != 3:
        raise ValueError(f"fused_qkv: x must be [B, S, C], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"fused_qkv: weight must be [3*heads*D, C], got shape {tuple(weight.shape)}")
    B, S, C = x.shape
    N, K = weight.shape
    if K != C:
        raise ValueError(f"fused_qkv: weight has {K} input features but x has C={C} (x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)})")
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"fused_qkv: heads must be a positive int, got {heads!r}")
    if N % (3 * heads):
        raise ValueError(f"fused_qkv: weight rows {N} are not 3 * heads * D for heads={heads}")
    D = N // (3 * heads)
    if not x.is_floating_point():
        raise TypeError(f"fused_qkv: x must be a floating tensor, got {x.dtype}")
    named = {"weight": weight, "bias": bias, "norm_q": norm_q, "norm_k": norm_k, "lora_a": lora_a, "lora_b": lora_b}
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"fused_qkv: {name} is on {t.device} but x is on {x.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"fused_qkv: weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"fused_qkv: bias must be [{N}], got {tuple(bias.shape)}")
    for name, t in (("norm_q", norm_q), ("norm_k", norm_k)):
        if t is not None and tuple(t.shape) != (D,):
            raise ValueError(f"fused_qkv: {name} must be [D={D}] (head_dim), got {tuple(t.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("fused_qkv: cos and sin must be given together")
    if cos is not None:
        if D % 2:
            raise ValueError(f"fused_qkv: RoPE needs an even head_dim, got D={D}")
        for name, t in (("cos", cos), ("sin", sin)):
            if tuple(t.shape) != (S, D // 2):
                raise ValueError(f"fused_qkv: {name} must be [S={S}, D//2={D // 2}], got {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise TypeError(f"fused_qkv: {name} must be float32, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"fused_qkv: {name} is on {t.device} but x is on {x.device}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("fused_qkv: lora_a and lora_b must be given together")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_a.shape[1] != C:
            raise ValueError(f"fused_qkv: lora_a must be [r, C={C}], got {tuple(lora_a.shape)}")
        r = lora_a.shape[0]
        if tuple(lora_b.shape) != (N, r):
            raise ValueError(f"fused_qkv: lora_b must be [{N}, r={r}], got {tuple(lora_b.shape)}")
    return D


def _rms_rope(t, w, cos, sin, eps):
    """fp32 epilogue for one of q/k: t [B, S, H, D] float32."""
    if w is not None:
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    if cos is not None:
        c = cos[None, :, None, :]
        s = sin[None, :, None, :]
        t0, t1 = t[..., 0::2], t[..., 1::2]
        t = torch.stack((t0 * c - t1 * s, t0 * s + t1 * c), dim=-1).flatten(-2)
    return t


def fused_qkv_torch(x, weight, bias=None, *, heads, norm_q=None, norm_k=None, cos=None, sin=None, eps=1e-6,
                    lora_a=None, lora_b=None, lora_scale=1.0):
    """The pure-torch path: differentiable torch ops, any device, same contract as `fused_qkv`."""
    B, S, _ = x.shape
    D = weight.shape[0] // (3 * heads)
    y = F.linear(x, weight, bias)
    if lora_a is not None and lora_a.shape[0] > 0:
        y = y + F.linear(F.linear(x, lora_a), lora_b) * lora_scale
    q, k, v = y.view(B, S, 3, heads, D).unbind(2)
    q = _rms_rope(q.float(), norm_q, cos, sin, eps).to(x.dtype)
    k = _rms_rope(k.float(), norm_k, cos, sin, eps).to(x.dtype)
    return q, k, v


def fused_qkv(x, weight, bias=None, *, heads, norm_q=None, norm_k=None, cos=None, sin=None, eps=1e-6,
              lora_a=None, lora_b=None, lora_scale=1.0):
    """Merged QKV projection + LoRA + QK RMSNorm + RoPE; see the module docstring for shapes."""
    check_inputs(x, weight, bias, heads, norm_q, norm_k, cos, sin, lora_a, lora_b)
    return fused_qkv_torch(x, weight, bias, heads=heads, norm_q=norm_q, norm_k=norm_k, cos=cos, sin=sin,
                           eps=eps, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale)


def joint_qkv(txt: dict, img: dict, *, heads: int, eps: float = 1e-6):
    """Both streams of a block -> joint q, k, v `[B, S_txt + S_img, heads, D]`, text rows first.

    `txt` and `img` hold `fused_qkv` arguments: x, weight, bias, norm_q, norm_k, cos, sin, lora_a, lora_b,
    lora_scale (all but x and weight optional).
    """
    outs = [fused_qkv(s["x"], s["weight"], s.get("bias"), heads=heads, norm_q=s.get("norm_q"),
                      norm_k=s.get("norm_k"), cos=s.get("cos"), sin=s.get("sin"), eps=eps,
                      lora_a=s.get("lora_a"), lora_b=s.get("lora_b"), lora_scale=s.get("lora_scale", 1.0))
            for s in (txt, img)]
    return tuple(torch.cat([t, i], dim=1) for t, i in zip(*outs))
