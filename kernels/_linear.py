"""`y = x W^T + b + s (x A^T) B^T` in torch: forward as peft computes it, and its backward. Shared by the QKV op and
the block ops (private)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(dtype):
    """The working dtype of epilogues and reductions: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def cast(t, dtype):
    # no dispatcher call for a same-dtype cast (every eager call pays for each one in host time)
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(t, s):
    # t * 1.0 is t bit for bit: skip the launch (a unit LoRA scale, alpha = r, is the common case)
    return t if s == 1.0 else t * s


def lora_linear(x, weight, bias=None, lora_a=None, lora_b=None, lora_scale=1.0):
    """peft `lora.Linear.forward` (vanilla LoRA, no dropout): base output plus `lora_B(lora_A(x)) * scaling`, the
    LoRA branch in the factors' dtype, the sum cast back to the base output's dtype."""
    y = F.linear(x, weight, bias)
    if lora_a is None:
        return y
    return (y + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * lora_scale).to(y.dtype)


def lora_linear_backward(dy, x2, weight, bias_dtype, lora_a, lora_b, lora_scale, need):
    """Gradients `(dx, dW, db, dA, dB)` of `y` for 2-D `x2` [M, C] and `dy` [M, N]; `need` holds the five flags
    (None where not needed, for the bias when `bias_dtype` is None (no bias), and for A and B when there is no
    LoRA or its rank is 0). The LoRA part runs in the
    factors' dtype, as peft's does. 2-D products as torch.mm (what matmul dispatches to for 2-D operands) and no
    same-dtype casts: fewer dispatcher calls per backward (host time, design.md section 9), the same bits."""
    need_x, need_w, need_b, need_a, need_lb = need
    dx = torch.mm(dy, weight) if need_x else None
    dw = torch.mm(dy.t(), x2) if need_w else None  # never when the base weight is frozen (LoRA training)
    db = dy.sum(0, dtype=acc_dtype(dy.dtype)).to(bias_dtype) if need_b and bias_dtype is not None else None
    da = dlb = None
    if lora_a is not None and lora_a.shape[0] > 0:
        ld = lora_a.dtype
        dyl, xl = cast(dy, ld), cast(x2, ld)
        ds = _scaled(torch.mm(dyl, lora_b), lora_scale)  # [M, r]
        if need_lb:
            dlb = _scaled(torch.mm(dyl.t(), torch.mm(xl, lora_a.t())), lora_scale)
        if need_a:
            da = torch.mm(ds.t(), xl)
        if dx is not None:
            dx = dx + cast(torch.mm(ds, lora_a), dx.dtype)
    return dx, dw, db, da, dlb
