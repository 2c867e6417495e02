"""Triton kernels of the block-level ops (private; imported lazily by `block_ops.py`; mirrored by `_torch_block.py`).

linear_gate_residual: cuBLAS computes y = x W^T + b (+ the LoRA delta by one more GEMM, beta=1), then
    `_gate_residual_kernel` reads y, residual and gate once and writes residual + gate * y, in fp32, rounded once.
modulated_layernorm: `_modulated_ln_kernel`, one program per row: fp32 mean and variance, normalise, modulate,
    round once.
linear_gelu: on CUDA in 16 bits without autograd, cuBLASLt's GELU epilogue on the fp32 accumulator
    (`torch._addmm_activation`, the tanh approximation on CUDA but exact erf on CPU, see its decomposition in
    torch/_decomp/decompositions.py); otherwise cuBLAS addmm then `_gelu_kernel`, keeping the pre-activation for
    backward.
Backward of all three: cuBLAS GEMMs and torch element-wise math in `block_ops.py`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_launch import INTERPRETED, alloc, cdiv, launcher, next_pow2  # noqa: F401 (INTERPRETED: for callers)

# a constexpr: compiled Triton rejects plain Python globals (the interpreter does not check)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit(do_not_specialize=["M", "S"])
def _gate_residual_kernel(Y, GATE, RES, OUT, M, S, N, stride_gate, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm[:, None] * N + rn[None, :]
    b = rm // S  # sample of each row: the gate is per sample, broadcast over the sequence
    g = tl.load(GATE + b[:, None] * stride_gate + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (r + g * y).to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["S"])
def _modulated_ln_kernel(X, SHIFT, SCALE, OUT, S, C, stride_shift, stride_scale, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean, 0.0)
    # torch.compile passes Python floats as fp64 scalars: keep the arithmetic fp32
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + tl.cast(eps, tl.float32))
    sh = tl.load(SHIFT + b * stride_shift + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * C + cols, (xc * rstd * (1.0 + sc) + sh).to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["numel"])
def _gelu_kernel(PRE, OUT, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    h = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    u = SQRT_2_OVER_PI * (h + 0.044715 * h * h * h)
    # 0.5 h (1 + tanh u) = h * sigmoid(2u): no cancellation near u = 0, and no tanh (libdevice fails under the
    # interpreter). The clamp only keeps exp finite: beyond it the result is below 1e-30 * |h| either way
    tl.store(OUT + offs, (h / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))).to(OUT.dtype.element_ty), mask=mask)


def _rows(t):
    """A per-sample [B, F] tensor with unit column stride (chunks of the modulation output already are)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_gelu(x, weight, bias, save_pre: bool, poison: bool):
    """gelu_tanh(x W^T + b) `[..., N]` and the pre-activation (empty unless save_pre)."""
    N, C = weight.shape
    x2 = x.reshape(-1, C)
    # cuBLASLt's GELU epilogue only for 16-bit outputs, whose rounding hides how its tanh is evaluated inside
    if x.device.type == "cuda" and bias is not None and not save_pre and x.dtype != torch.float32:
        out = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], N), x.new_empty(0)
    pre = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    out = alloc(pre.shape, pre, poison)
    numel = pre.numel()
    if numel:
        block = 1024
        launcher(_gelu_kernel, out)[(cdiv(numel, block),)](pre, out, numel, BLOCK=block, num_warps=4)
    shape = (*x.shape[:-1], N)
    return out.view(shape), (pre.view(shape) if save_pre else x.new_empty(0))


def linear_gate_residual(x, weight, bias, gate, residual, lora_a, lora_b, lora_scale: float, poison: bool):
    """The new residual `[B, S, N]` and y = x W^T + b (+ LoRA) `[B, S, N]` (kept for the gate's gradient)."""
    B, S, C = x.shape
    N = weight.shape[0]
    M = B * S
    x2 = x.reshape(M, C)
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    if lora_a is not None:
        # the LoRA product in the factors' dtype as peft computes it (fp32 factors beside a half-precision base
        # keep y fp32 until the epilogue rounds once); added into y by the GEMM itself (beta=1), no extra pass
        acc = torch.promote_types(y.dtype, lora_b.dtype)
        sl = (x2.to(lora_a.dtype) @ lora_a.t()).to(acc)
        y = y.to(acc)
        y.addmm_(sl, lora_b.to(acc).t(), alpha=lora_scale)
    out = alloc((B, S, N), residual, poison)
    gate = _rows(gate)
    residual = residual.contiguous()
    if M:
        bm, bn = 32, 128
        launcher(_gate_residual_kernel, out)[(cdiv(M, bm), cdiv(N, bn))](
            y, gate, residual, out, M, S, N, gate.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out, y.view(B, S, N)


def modulated_layernorm(x, shift, scale, eps: float, poison: bool):
    B, S, C = x.shape
    x = x.contiguous()
    shift, scale = _rows(shift), _rows(scale)
    out = alloc((B, S, C), x, poison)
    if B * S:
        block_c = next_pow2(C)
        launcher(_modulated_ln_kernel, out)[(B * S,)](
            x, shift, scale, out, S, C, shift.stride(0), scale.stride(0), float(eps), BLOCK_C=block_c,
            num_warps=min(16, max(1, block_c // 256)))
    return out
