"""Relative error, the one measure every equivalence check here uses (`qwen-fused check`, bench, tests)."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """`(max |a - ref| / max |ref|, ||a - ref|| / ||ref||)` in float64; inf where `a` is not finite. An all-zero
    `ref` must be matched exactly (its scale counts as the smallest float64)."""
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} differs from the reference's {tuple(ref.shape)}")
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    d = a - ref
    tiny = torch.finfo(torch.float64).tiny
    return (d.abs().max() / ref.abs().max().clamp_min(tiny)).item(), (d.norm() / ref.norm().clamp_min(tiny)).item()
