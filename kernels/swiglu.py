"""Merged SwiGLU: the gate and up projections of a SwiGLU MLP as one GEMM, the gate applied after it.

    swiglu(x, weight, bias=None, *, lora_a=None, lora_b=None, lora_scale=1.0) -> silu(g) * u
        x [..., C], weight [2N, C] rows: W_gate then W_up (Qwen-Image 2.1: `cat([gate_layer, proj])`),
        bias [2N] or None, lora_a [r, C], lora_b [2N, r] (both or neither)                      -> [..., N]

        y = x W^T + b + lora_scale * (x A^T) B^T;  g, u = y[..., :N], y[..., N:]

A LoRA on one part only is a merged LoRA whose B is zero in the other part's rows; LoRAs on both parts are one
with A concatenated and B block-diagonal (exact: the zero blocks add exact zeros). Differentiable with respect to
every tensor argument. Example (one 2.1 MLP)::

    h = swiglu(x, torch.cat([mlp.gate_layer.weight, mlp.proj.weight]))
    out = mlp.out(h)

The backend setting (backend.py) routes each call once: the torch path (`_torch_swiglu.py`) is stock's exact op
sequence (plain autograd); the Triton route (`_triton_swiglu.py`) runs the GEMM on cuBLAS and the gate in one Triton
pass that computes in fp32 and rounds once (backward: one Triton pass for dg and du, then cuBLAS GEMMs). Under
torch.compile the torch path runs: inductor fuses the gate itself. Inputs of the Triton route share x's floating
dtype (LoRA factors may be of another floating dtype, as peft allows).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _available, _linear, _torch_swiglu
from .backend import debug_nan, use_triton

__all__ = ["swiglu"]


def check_inputs(x, weight, bias, lora_a, lora_b) -> int:
    """Validate the swiglu contract; returns N (the output features). Errors name the argument and the shapes."""
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise ValueError(f"swiglu: weight must be [2N, C] (gate rows, then up rows), got {tuple(weight.shape)}")
    n2, c = weight.shape
    if x.dim() == 0 or x.shape[-1] != c:
        raise ValueError(f"swiglu: weight {tuple(weight.shape)} takes C={c} input features but x has shape "
                         f"{tuple(x.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"swiglu: {name} must be a floating tensor, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"swiglu: {name} is on {t.device} but x is on {x.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"swiglu: weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if bias is not None and bias.shape != (n2,):
        raise ValueError(f"swiglu: bias must be [2N={n2}], got {tuple(bias.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("swiglu: lora_a and lora_b must be given together")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_a.shape[1] != c:
            raise ValueError(f"swiglu: lora_a must be [r, C={c}], got {tuple(lora_a.shape)}")
        if lora_b.shape != (n2, lora_a.shape[0]):
            raise ValueError(f"swiglu: lora_b must be [2N={n2}, r={lora_a.shape[0]}], got {tuple(lora_b.shape)}")
        if lora_a.dtype != lora_b.dtype:
            raise TypeError(f"swiglu: lora_a and lora_b must share one dtype, got {lora_a.dtype} and {lora_b.dtype}")
    return n2 // 2


def triton_problem(x: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """Why the Triton route cannot serve this call, or None when it can."""
    problem = _available.triton_problem(x.device.type, x.dtype)
    if problem:
        return problem
    if bias is not None and bias.dtype != x.dtype:
        return f"bias dtype {bias.dtype} differs from x dtype {x.dtype}"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled (the kernels take inputs in one dtype)"
    return None


def swiglu(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, lora_a: Tensor | None = None,
           lora_b: Tensor | None = None, lora_scale: float = 1.0) -> Tensor:
    """silu(g) * u of `y = x W^T + b + s (x A^T) B^T = [g | u]`; see the module docstring for shapes."""
    check_inputs(x, weight, bias, lora_a, lora_b)
    # under torch.compile the torch path, always: inductor fuses the gate itself
    if torch.compiler.is_compiling() or not use_triton(x.device.type, lambda: triton_problem(x, weight, bias)):
        return _torch_swiglu.swiglu(x, weight, bias, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale)
    return _TritonSwiGLU.apply(x, weight, bias, lora_a, lora_b, float(lora_scale))


class _TritonSwiGLU(torch.autograd.Function):
    """cuBLAS GEMM(s), then the gate in one Triton pass; backward: one Triton pass for dy, then cuBLAS GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, lora_scale):
        from . import _triton_swiglu

        x2 = x.reshape(-1, x.shape[-1])
        y = _linear.lora_linear(x2, weight, bias, lora_a, lora_b, lora_scale).contiguous()
        h = _triton_swiglu.gate_forward(y, poison=debug_nan())
        ctx.save_for_backward(x2, weight, lora_a, lora_b, y)
        ctx.lora_scale, ctx.bias_dtype, ctx.x_shape = lora_scale, None if bias is None else bias.dtype, x.shape
        return h.view(*x.shape[:-1], h.shape[-1])

    @staticmethod
    def backward(ctx, dh):
        from . import _triton_swiglu

        x2, weight, lora_a, lora_b, y = ctx.saved_tensors
        dy = _triton_swiglu.gate_backward(dh.reshape(y.shape[0], -1).contiguous(), y, poison=debug_nan())
        need = ctx.needs_input_grad[:5]
        dx, dw, db, da, dlb = _linear.lora_linear_backward(dy, x2, weight, ctx.bias_dtype, lora_a, lora_b,
                                                           ctx.lora_scale, need)
        return (None if dx is None else dx.view(ctx.x_shape)), dw, db, da, dlb, None
