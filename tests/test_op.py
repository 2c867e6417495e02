"""`fused_qkv` torch path vs an independent float64 reference, the stock modules, and its input checks."""
import itertools

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from helpers import assert_close

from qwen_fused.kernels import fused_qkv, rope_tables


def reference(x, w, b, heads, nq, nk, angles, eps, a, bb, scale):
    """float64, written per head and per pair with complex numbers (independent of the op's code)."""
    x, w = x.double(), w.double()
    y = x @ w.T
    if b is not None:
        y = y + b.double()
    if a is not None:
        y = y + scale * (x @ a.double().T) @ bb.double().T
    B, S, _ = x.shape
    q, k, v = y.reshape(B, S, 3, heads, -1).unbind(2)

    def epi(t, nw):
        if nw is not None:
            t = t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * nw.double()
        if angles is not None:
            tc = torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2).contiguous())
            tc = tc * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
            t = torch.view_as_real(tc).flatten(-2)
        return t

    return epi(q, nq), epi(k, nk), v


SHAPES = [(1, 1, 32, 1, 16), (3, 37, 48, 2, 32), (2, 70, 40, 3, 64), (1, 5, 24, 1, 128)]  # B, S, C, H, D


@pytest.mark.parametrize("B,S,C,H,D", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias,norm,rope,rank", list(itertools.product([0, 1], [0, 1], [0, 1], [0, 5])))
def test_matches_float64_reference(B, S, C, H, D, bias, norm, rope, rank):
    g = torch.Generator().manual_seed(B * 1000 + S)
    N = 3 * H * D
    x = torch.randn(B, S, C, generator=g)
    w = torch.randn(N, C, generator=g) / C ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    nq, nk = (torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5) if norm else (None, None)
    angles = torch.rand(S, D // 2, generator=g, dtype=torch.float64) * 6.28 if rope else None
    cos, sin = (angles.cos().float(), angles.sin().float()) if rope else (None, None)
    a = torch.randn(rank, C, generator=g) / C ** 0.5 if rank else None
    bb = torch.randn(N, rank, generator=g) if rank else None
    leaves = [t for t in (x, w, b, nq, nk, a, bb) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    out = fused_qkv(x, w, b, heads=H, norm_q=nq, norm_k=nk, cos=cos, sin=sin, lora_a=a, lora_b=bb, lora_scale=0.7)
    ref = reference(x, w, b, H, nq, nk, angles, 1e-6, a, bb, 0.7)
    for name, o, r in zip("qkv", out, ref):
        assert o.shape == (B, S, H, D) and o.dtype == x.dtype
        assert_close(o, r, 1e-5, name)
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out]
    grads = torch.autograd.grad([o.double() for o in out], leaves, gouts)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(leaves64)
    args = [next(it) if t is not None else None for t in (x, w, b, nq, nk, a, bb)]
    ref = reference(args[0], args[1], args[2], H, args[3], args[4], angles, 1e-6, args[5], args[6], 0.7)
    ref_grads = torch.autograd.grad(ref, leaves64, gouts)
    for i, (gr, rr) in enumerate(zip(grads, ref_grads)):
        assert_close(gr, rr, 1e-5, f"grad {i}")


def test_matches_stock_modules():
    """Same math as diffusers' unflatten + RMSNorm + apply_rotary_emb_qwen on separate projections."""
    torch.manual_seed(0)
    B, S, C, H, D = 2, 11, 64, 2, 32
    x = torch.randn(B, S, C)
    lin = [torch.nn.Linear(C, H * D) for _ in range(3)]
    nq, nk = RMSNorm(D, eps=1e-6), RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        nq.weight.uniform_(0.5, 1.5)
        nk.weight.uniform_(0.5, 1.5)
    freqs = torch.polar(torch.ones(S, D // 2), torch.rand(S, D // 2) * 6)
    q_ref = apply_rotary_emb_qwen(nq(lin[0](x).unflatten(-1, (H, D))), freqs, use_real=False)
    k_ref = apply_rotary_emb_qwen(nk(lin[1](x).unflatten(-1, (H, D))), freqs, use_real=False)
    v_ref = lin[2](x).unflatten(-1, (H, D))
    w = torch.cat([l.weight for l in lin])
    b = torch.cat([l.bias for l in lin])
    cos, sin = rope_tables(freqs)
    q, k, v = fused_qkv(x, w, b, heads=H, norm_q=nq.weight, norm_k=nk.weight, cos=cos, sin=sin)
    for o, r, n in ((q, q_ref, "q"), (k, k_ref, "k"), (v, v_ref, "v")):
        assert_close(o, r, 1e-5, n)


def test_rope_tables():
    ang = torch.rand(7, 4) * 6
    cos, sin = rope_tables(torch.polar(torch.ones(7, 4), ang))
    assert cos.dtype == torch.float32 and cos.is_contiguous() and cos.shape == (7, 4)
    torch.testing.assert_close(cos, ang.cos())
    torch.testing.assert_close(sin, ang.sin())
    with pytest.raises(TypeError, match="complex"):
        rope_tables(ang)


def _args(**over):
    B, S, C, H, D = 2, 5, 16, 2, 8
    kw = dict(x=torch.randn(B, S, C), weight=torch.randn(3 * H * D, C), bias=torch.randn(3 * H * D), heads=H,
              norm_q=torch.ones(D), norm_k=torch.ones(D), cos=torch.ones(S, D // 2), sin=torch.zeros(S, D // 2),
              lora_a=torch.randn(3, C), lora_b=torch.randn(3 * H * D, 3))
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.randn(5, 16)), ValueError, r"x must be \[B, S, C\]"),
    (dict(weight=torch.randn(48, 15)), ValueError, "input features"),
    (dict(heads=5), ValueError, "3 \\* heads \\* D"),
    (dict(bias=torch.randn(47)), ValueError, "bias must be"),
    (dict(norm_q=torch.ones(16)), ValueError, "head_dim"),
    (dict(cos=torch.ones(4, 4)), ValueError, "cos must be"),
    (dict(cos=torch.ones(5, 4, dtype=torch.float64)), TypeError, "float32"),
    (dict(sin=None), ValueError, "together"),
    (dict(lora_b=torch.randn(48, 4)), ValueError, "lora_b must be"),
    (dict(lora_a=torch.randn(3, 15)), ValueError, "lora_a must be"),
    (dict(weight=torch.randn(48, 16, dtype=torch.float64)), TypeError, "dtype"),
    (dict(norm_k=torch.ones(8, device="meta")), ValueError, "norm_k is on meta"),
])
def test_bad_inputs_raise_clear_errors(over, exc, match):
    kw = _args(**over)
    x, w = kw.pop("x"), kw.pop("weight")
    with pytest.raises(exc, match=match):
        fused_qkv(x, w, **kw)
