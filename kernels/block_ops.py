"""Block-level fused ops of a Qwen-Image transformer block (the MLP and the gated residual adds).

    linear_gelu(x, weight, bias=None) -> gelu_tanh(x W^T + b)
        x [..., C], weight [N, C], bias [N] or None                          -> [..., N]

    linear_gate_residual(x, weight, bias, gate, residual, *, lora_a=None, lora_b=None, lora_scale=1.0)
        -> residual + gate[:, None, :] * (x W^T + b + lora_scale * (x A^T) B^T)
        x [B, S, C], weight [N, C], bias [N] or None, gate [B, N], residual [B, S, N],
        lora_a [r, C], lora_b [N, r] (both or neither)                       -> [B, S, N]

    modulated_layernorm(x, shift, scale, eps=1e-6)
        -> layer_norm(x, no affine, eps) * (1 + scale[:, None, :]) + shift[:, None, :]
        x [B, S, C], shift [B, C], scale [B, C]                              -> [B, S, C]

All three are differentiable with respect to every tensor argument. Example (one image-stream MLP half-block)::

    h = modulated_layernorm(x, shift2, scale2)
    x = linear_gate_residual(linear_gelu(h, w1, b1), w2, b2, gate2, x)

The backend setting (backend.py) routes each call once: the torch path (`_torch_block.py`) is stock diffusers'
exact op sequence, rounding after every step; the Triton route (`_triton_block.py`: cuBLAS GEMMs plus one Triton
epilogue pass, or one Triton pass per row for the norm) computes each epilogue in fp32 and rounds once, so it is
no further from a float64 reference than stock (design.md section 1). The Triton route runs as torch.library
custom ops with registered backward, so torch.compile(fullgraph=True) keeps them whole.

Inputs of the Triton route share x's floating dtype (LoRA factors may be of another floating dtype, as peft
allows) and are not under autocast; other calls run the torch path under `auto` and raise `BackendError` under
`triton`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _available, _linear, _torch_block
from .backend import debug_nan, use_triton

__all__ = ["linear_gelu", "linear_gate_residual", "modulated_layernorm"]


# ----------------------------------------------------------------------------------------------------------
# validation: errors name the op, the argument and the shapes involved


def _same_device(op, x, named):
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _floating(op, named):
    for name, t in named.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")


def _check_linear(op, x, weight, bias):
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [N, C], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} takes C={K} input features but x has shape "
                         f"{tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{op}: bias must be [N={N}] for weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    return N


def _check_3d(op, x):
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, S, C], got shape {tuple(x.shape)}")
    return x.shape


def _check_per_sample(op, name, t, B, F_, what):
    if tuple(t.shape) != (B, F_):
        raise ValueError(f"{op}: {name} must be [B={B}, {what}={F_}], got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------------------
# the route: `torch` or `triton`, decided once per call from the backend setting and what the kernels serve


def triton_problem(x: Tensor, tensors: dict) -> str | None:
    """Why the Triton kernels cannot serve a call with input `x` and the other `tensors`, or None when they can."""
    problem = _available.triton_problem(x.device.type, x.dtype)
    if problem:
        return problem
    for name, t in tensors.items():
        if t is not None and t.dtype != x.dtype and name not in ("lora_a", "lora_b"):
            return f"{name} dtype {t.dtype} differs from x dtype {x.dtype}"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled (the kernels take inputs in one dtype)"
    return None


def route(x: Tensor, tensors: dict) -> str:
    """`torch` or `triton`. Raises under a `triton*` backend that cannot serve the call; `auto` falls back to the
    torch path with one warning per reason."""
    return "triton" if use_triton(x.device.type, lambda: triton_problem(x, tensors)) else "torch"


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# public entry points


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """gelu_tanh(x W^T + b): x [..., C], weight [N, C], bias [N] or None -> [..., N]."""
    op = "linear_gelu"
    _check_linear(op, x, weight, bias)
    named = {"weight": weight, "bias": bias}
    _floating(op, {"x": x, **named})
    _same_device(op, x, named)
    if route(x, named) == "torch":
        return _torch_block.linear_gelu(x, weight, bias)
    # the pre-activation is kept only for backward (GELU's derivative needs it)
    return torch.ops.qwen_fused.linear_gelu(x, weight, bias, _needs_grad(x, weight, bias), "triton")[0]


def linear_gate_residual(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, residual: Tensor, *,
                         lora_a: Tensor | None = None, lora_b: Tensor | None = None,
                         lora_scale: float = 1.0) -> Tensor:
    """residual + gate[:, None, :] * (x W^T + b + lora_scale * (x A^T) B^T); shapes in the module docstring."""
    op = "linear_gate_residual"
    B, S, C = _check_3d(op, x)
    N = _check_linear(op, x, weight, bias)
    _check_per_sample(op, "gate", gate, B, N, "N")
    if tuple(residual.shape) != (B, S, N):
        raise ValueError(f"{op}: residual must be [B={B}, S={S}, N={N}] (x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}), got {tuple(residual.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{op}: lora_a and lora_b must be given together")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_a.shape[1] != C:
            raise ValueError(f"{op}: lora_a must be [r, C={C}], got {tuple(lora_a.shape)}")
        if tuple(lora_b.shape) != (N, lora_a.shape[0]):
            raise ValueError(f"{op}: lora_b must be [N={N}, r={lora_a.shape[0]}], got {tuple(lora_b.shape)}")
        if lora_a.dtype != lora_b.dtype:
            raise TypeError(f"{op}: lora_a and lora_b must share one dtype, got {lora_a.dtype} and {lora_b.dtype}")
    named = {"weight": weight, "bias": bias, "gate": gate, "residual": residual, "lora_a": lora_a, "lora_b": lora_b}
    _floating(op, {"x": x, **named})
    _same_device(op, x, named)
    if route(x, named) == "torch":
        return _torch_block.linear_gate_residual(x, weight, bias, gate, residual, lora_a=lora_a, lora_b=lora_b,
                                                 lora_scale=lora_scale)
    return torch.ops.qwen_fused.linear_gate_residual(x, weight, bias, gate, residual, lora_a, lora_b,
                                                     float(lora_scale), "triton")[0]


def modulated_layernorm(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """layer_norm(x, no affine) * (1 + scale[:, None, :]) + shift[:, None, :]: x [B, S, C], shift/scale [B, C]."""
    op = "modulated_layernorm"
    B, S, C = _check_3d(op, x)
    _check_per_sample(op, "shift", shift, B, C, "C")
    _check_per_sample(op, "scale", scale, B, C, "C")
    named = {"shift": shift, "scale": scale}
    _floating(op, {"x": x, **named})
    _same_device(op, x, named)
    if route(x, named) == "torch":
        return _torch_block.modulated_layernorm(x, shift, scale, eps)
    return torch.ops.qwen_fused.modulated_layernorm(x, shift, scale, float(eps), "triton")


# ----------------------------------------------------------------------------------------------------------
# the custom ops. `impl` is the route ("triton" or "torch"); the entry points pass "triton", a direct call of the
# op (opcheck, torch.compile of the op) leaves it None and gets `route`'s. The torch branches below return what
# the kernels return, for direct calls the kernels cannot serve. Backward: cuBLAS GEMMs and torch element-wise
# math in fp32 (stock autograd's formulas), the same for both routes.


def _op_route(impl, x, tensors):
    return route(x, tensors) if impl is None else impl


@torch.library.triton_op("qwen_fused::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Tensor | None, save_pre: bool,
                    impl: str | None = None) -> tuple[Tensor, Tensor]:
    """gelu_tanh(x W^T + b) and the pre-activation x W^T + b (empty unless save_pre)."""
    if _op_route(impl, x, {"weight": weight, "bias": bias}) == "triton":
        from . import _triton_block

        return _triton_block.linear_gelu(x, weight, bias, save_pre, debug_nan())
    pre = F.linear(x, weight, bias)
    return F.gelu(pre, approximate="tanh"), (pre if save_pre else x.new_empty(0))


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.mark_non_differentiable(output[1])


def _linear_gelu_backward(ctx, dout, _dpre):
    x, weight, bias, pre = ctx.saved_tensors
    if pre.numel() == 0 and x.numel() > 0:  # a direct op call without save_pre: recompute
        pre = F.linear(x, weight, bias)
    dh = torch.ops.aten.gelu_backward(dout, pre, approximate="tanh")
    C, N = weight.shape[1], weight.shape[0]
    dh2, x2 = dh.reshape(-1, N), x.reshape(-1, C)
    need = ctx.needs_input_grad
    dx = (dh2 @ weight).view(x.shape) if need[0] else None
    dw = dh2.t() @ x2 if need[1] else None
    db = dh2.sum(0) if ctx.has_bias and need[2] else None
    return (dx, dw, db) + (None,) * (len(need) - 3)


_linear_gelu_op.register_autograd(_linear_gelu_backward, setup_context=_linear_gelu_setup)


@torch.library.triton_op("qwen_fused::linear_gate_residual", mutates_args=())
def _linear_gate_residual_op(x: Tensor, weight: Tensor, bias: Tensor | None, gate: Tensor, residual: Tensor,
                             lora_a: Tensor | None, lora_b: Tensor | None, lora_scale: float,
                             impl: str | None = None) -> tuple[Tensor, Tensor]:
    """The new residual and y = x W^T + b (+ LoRA) kept for the gate's gradient."""
    named = {"weight": weight, "bias": bias, "gate": gate, "residual": residual, "lora_a": lora_a, "lora_b": lora_b}
    if _op_route(impl, x, named) == "triton":
        from . import _triton_block

        return _triton_block.linear_gate_residual(x, weight, bias, gate, residual, lora_a, lora_b, lora_scale,
                                                  debug_nan())
    y = _linear.lora_linear(x, weight, bias, lora_a, lora_b, lora_scale)
    return residual + gate.unsqueeze(1) * y, y


def _lgr_setup(ctx, inputs, output):
    x, weight, bias, gate, residual, lora_a, lora_b, lora_scale = inputs[:8]
    ctx.lora_scale = lora_scale
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, gate, lora_a, lora_b, output[1])


def _lgr_backward(ctx, dout, _dy):
    x, weight, gate, lora_a, lora_b, y = ctx.saved_tensors
    need = ctx.needs_input_grad
    s = ctx.lora_scale
    B, S, C = x.shape
    N = weight.shape[0]
    grads = [None] * len(need)
    if need[4]:
        grads[4] = dout
    if need[3]:
        acc = _linear.acc_dtype(dout.dtype)
        grads[3] = (dout.to(acc) * y.to(acc)).sum(1).to(gate.dtype)
    if not any(need[i] for i in (0, 1, 2, 5, 6)):
        return tuple(grads)
    dy = (dout * gate.unsqueeze(1)).reshape(B * S, N)
    flags = (need[0], need[1], need[2], need[5], need[6])
    dx, grads[1], grads[2], grads[5], grads[6] = _linear.lora_linear_backward(
        dy, x.reshape(B * S, C), weight, ctx.bias_dtype, lora_a, lora_b, s, flags)
    if dx is not None:
        grads[0] = dx.view(B, S, C)
    return tuple(grads)


_linear_gate_residual_op.register_autograd(_lgr_backward, setup_context=_lgr_setup)


@torch.library.triton_op("qwen_fused::modulated_layernorm", mutates_args=())
def _modulated_layernorm_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float, impl: str | None = None) -> Tensor:
    if _op_route(impl, x, {"shift": shift, "scale": scale}) == "triton":
        from . import _triton_block

        return _triton_block.modulated_layernorm(x, shift, scale, eps, debug_nan())
    return _torch_block.modulated_layernorm(x, shift, scale, eps)


def _mln_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs[:4]
    ctx.eps, ctx.shift_dtype = eps, shift.dtype
    ctx.save_for_backward(x, scale)


def _mln_backward(ctx, dout):
    # statistics recomputed in fp32 from x (one more read of x instead of keeping them)
    x, scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    acc = _linear.acc_dtype(x.dtype)
    xf, g = x.to(acc), dout.to(acc)
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xf - mean).square().mean(-1, keepdim=True) + ctx.eps)
    xhat = (xf - mean) * rstd
    grads = [None] * len(need)
    if need[0]:
        gx = g * (1 + scale.to(acc).unsqueeze(1))
        grads[0] = (rstd * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))).to(x.dtype)
    if need[1]:
        grads[1] = g.sum(1).to(ctx.shift_dtype)
    if need[2]:
        grads[2] = (g * xhat).sum(1).to(scale.dtype)
    return tuple(grads)


_modulated_layernorm_op.register_autograd(_mln_backward, setup_context=_mln_setup)
