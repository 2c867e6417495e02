"""Triton kernels of the merged SwiGLU's gate (private; imported lazily by `swiglu.py`; mirrored by
`_torch_swiglu.py`).

cuBLAS computes `y = x W^T + b` (+ the LoRA delta) as `_linear.lora_linear` does; then `_gate_kernel` reads the
gate and up halves of each row of y once and writes `silu(g) * u`, in fp32, rounded once (stock rounds after SiLU
and after the product). Backward: `_gate_backward_kernel` reads dh, g and u once and writes dg and du side by side
(the gradient of y), then cuBLAS GEMMs (`_linear.lora_linear_backward`). One fixed launch configuration each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_launch import INTERPRETED, alloc, cdiv, launcher  # noqa: F401 (INTERPRETED: for callers)

BLOCK_M, BLOCK_N, NUM_WARPS = 4, 512, 4  # a tile of rows x gate columns per program


@triton.jit(do_not_specialize=["M"])
def _gate_kernel(Y, H, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    gate_offs = rm[:, None] * (2 * N) + rn[None, :]  # y rows are [gate | up], 2N wide
    g = tl.load(Y + gate_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Y + gate_offs + N, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + rm[:, None] * N + rn[None, :], h.to(H.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _gate_backward_kernel(DH, Y, DY, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    gate_offs = rm[:, None] * (2 * N) + rn[None, :]
    dh = tl.load(DH + rm[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(Y + gate_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Y + gate_offs + N, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    tl.store(DY + gate_offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DY.dtype.element_ty), mask=mask)
    tl.store(DY + gate_offs + N, (dh * g * sig).to(DY.dtype.element_ty), mask=mask)


def gate_forward(y: torch.Tensor, poison: bool = False) -> torch.Tensor:
    """`silu(y[:, :N]) * y[:, N:]` of a contiguous `y` [M, 2N] -> [M, N] in y's dtype."""
    M, N = y.shape[0], y.shape[1] // 2
    h = alloc((M, N), y, poison)
    if M and N:
        launcher(_gate_kernel, h)[(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))](
            y, h, M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return h


def gate_backward(dh: torch.Tensor, y: torch.Tensor, poison: bool = False) -> torch.Tensor:
    """The gradient of `y` [M, 2N] (contiguous) from `dh` [M, N] (contiguous): `[dg | du]` in y's dtype."""
    M, N = y.shape[0], y.shape[1] // 2
    dy = alloc((M, 2 * N), y, poison)
    if M and N:
        launcher(_gate_backward_kernel, dy)[(cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))](
            dh, y, dy, M, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return dy
