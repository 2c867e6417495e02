"""Pure-torch implementation of the fused QKV op (private; mirrors `_triton_qkv.py`).

`fused_qkv_torch` and `qkv_epilogue` are the torch path: differentiable torch ops on any device, plain autograd.
`forward` and `epilogue_backward` are the custom op's torch branches, with the arguments and results of their
Triton counterparts, for direct op calls that the kernels do not serve. The epilogue runs in fp32 (float64
stays float64, for references) and rounds once to the output dtype, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._linear import acc_dtype


def project(x, weight, bias, lora_a, lora_b, lora_scale):
    """y = x W^T + b + s (x A^T) B^T; LoRA in its own dtype as peft computes it (the sum may promote)."""
    y = F.linear(x, weight, bias)
    if lora_a is not None and lora_a.shape[0] > 0:
        y = y + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * lora_scale
    return y


def _rms_rope(t, w, cos, sin, eps):
    """fp32 epilogue for one of q/k: t [B, S, H, D] float32."""
    if w is not None:
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w.to(t.dtype)
    if cos is not None:
        c = cos[None, :, None, :]
        s = sin[None, :, None, :]
        t0, t1 = t[..., 0::2], t[..., 1::2]
        t = torch.stack((t0 * c - t1 * s, t0 * s + t1 * c), dim=-1).flatten(-2)
    return t


def fused_qkv_torch(x, weight, bias=None, *, heads, norm_q=None, norm_k=None, cos=None, sin=None, eps=1e-6,
                    lora_a=None, lora_b=None, lora_scale=1.0):
    """The pure-torch path: differentiable torch ops, any device, same contract as `fused_qkv`."""
    y = project(x, weight, bias, lora_a, lora_b, lora_scale)
    return qkv_epilogue(y, heads=heads, norm_q=norm_q, norm_k=norm_k, cos=cos, sin=sin, eps=eps, out_dtype=x.dtype)


def qkv_epilogue(y, *, heads, norm_q=None, norm_k=None, cos=None, sin=None, eps=1e-6, out_dtype=None):
    """The epilogue alone, for a projection computed elsewhere (e.g. a peft layer with dropout or DoRA):
    `y [B, S, 3 * heads * D]` -> q, k, v `[B, S, heads, D]` in `out_dtype` (default y.dtype), QK RMSNorm + RoPE
    in fp32 (float64 stays float64, for references) as `fused_qkv`."""
    B, S, N = y.shape
    if N % (3 * heads):
        raise ValueError(f"qkv_epilogue: y has {N} features, not 3 * heads * D for heads={heads}")
    out = out_dtype or y.dtype
    q, k, v = y.view(B, S, 3, heads, N // (3 * heads)).unbind(2)
    acc = acc_dtype(y.dtype)
    return (_rms_rope(q.to(acc), norm_q, cos, sin, eps).to(out), _rms_rope(k.to(acc), norm_k, cos, sin, eps).to(out),
            v.to(out))


def forward(streams, heads, eps, save_y):
    """As `_triton_qkv.forward`: joint q, k, v and the pre-norm q|k (empty unless save_y)."""
    qs, ks, vs, ys = [], [], [], []
    for st in streams:
        x = st["x"]
        y = project(x, st["weight"], st["bias"], st["lora_a"], st["lora_b"], st["lora_scale"])
        q, k, v = qkv_epilogue(y, heads=heads, norm_q=st["norm_q"], norm_k=st["norm_k"], cos=st["cos"],
                               sin=st["sin"], eps=eps, out_dtype=x.dtype)
        qs.append(q)
        ks.append(k)
        vs.append(v)
        ys.append(y[..., : 2 * y.shape[-1] // 3].to(x.dtype))
    x0 = streams[0]["x"]
    y = torch.cat(ys, dim=1) if save_y else x0.new_empty(0)
    return torch.cat(qs, dim=1), torch.cat(ks, dim=1), torch.cat(vs, dim=1), y


def epilogue_backward(dq, dk, dv, y, streams, heads, eps, need_dnorm):
    """As `_triton_qkv.epilogue_backward`: dY `[sum M, 3 * H * D]` and the norm-weight gradients."""
    B, _, H, D = dq.shape
    acc = acc_dtype(dq.dtype)
    dys, dnorms = [], []
    off = 0
    for st in streams:
        S = st["x"].shape[1]
        rows = slice(off, off + S)
        parts, dn = [], []
        for j, (g, w) in enumerate(((dq[:, rows], st["norm_q"]), (dk[:, rows], st["norm_k"]))):
            g = g.to(acc)
            if st["cos"] is not None:
                c, s = st["cos"][None, :, None, :].to(acc), st["sin"][None, :, None, :].to(acc)
                ge, go = g[..., 0::2], g[..., 1::2]
                g = torch.stack((ge * c + go * s, go * c - ge * s), dim=-1).flatten(-2)
            if w is not None:
                t = y[:, rows, j * H * D:(j + 1) * H * D].reshape(B, S, H, D).to(acc)
                rstd = torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
                xh = t * rstd
                dn.append((g * xh).sum((0, 1, 2)))
                gx = g * w.to(acc)
                g = rstd * (gx - xh * (gx * xh).mean(-1, keepdim=True))
            else:
                dn.append(torch.zeros(D, dtype=acc, device=dq.device))
            parts.append(g.to(dq.dtype))
        parts.append(dv[:, rows])
        dys.append(torch.cat(parts, dim=2).reshape(B * S, 3 * H * D))
        dnorms.append(torch.stack(dn).float() if need_dnorm else torch.zeros(2, D, device=dq.device))
        off += S
    return torch.cat(dys), torch.stack(dnorms)
