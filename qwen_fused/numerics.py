"""The numbers behind every equivalence check here (`qwen-fused check`, bench, tests): relative error, and the
random parameters of the models they compare."""
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


def random_parameters(model: torch.nn.Module, seed: int, dtype: torch.dtype, device) -> torch.nn.Module:
    """Give every parameter of `model` (built on the meta device) random values, in place, on `device`.

    Weights are N(0, 1/fan_in), biases N(0, 0.1), norm weights U(0.5, 1.5): every parameter matters (a norm weight
    of exactly 1 or a zero bias would hide a missing multiply or add) and activations stay O(1) at any width. Drawn
    one at a time in float32, in module order, then rounded to `dtype`: the same seed gives the same weights in
    every dtype (rounded), and a real-size model never exists in float32."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    for module_name, mod in model.named_modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            t = torch.empty(p.shape, device=device, dtype=torch.float32)
            if p.dim() > 1:
                t.normal_(0, p.shape[1] ** -0.5, generator=g)
            elif name == "weight" and "norm" in f"{module_name}.{name}":
                t.uniform_(0.5, 1.5, generator=g)
            else:
                t.normal_(0, 0.1, generator=g)
            mod._parameters[name] = torch.nn.Parameter(t.to(dtype), requires_grad=p.requires_grad)
    return model
