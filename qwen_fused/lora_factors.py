"""What the fused processor hands to the kernel for one merged projection: base weight, bias, LoRA factors."""
from __future__ import annotations

from torch import nn


def linear_lora_factors(proj: nn.Module):
    """`(weight, bias, lora_a, lora_b, lora_scale)` of a merged projection; LoRA parts None without LoRA."""
    if isinstance(proj, nn.Linear):
        return proj.weight, proj.bias, None, None, 1.0
    raise TypeError(f"fused processor cannot read the projection {type(proj).__name__}")
