"""What the fused processor hands to the kernel for one merged projection: base weight, bias, LoRA factors."""
from __future__ import annotations

import torch
from torch import nn


def linear_lora_factors(proj: nn.Module):
    """`(weight, bias, lora_a, lora_b, lora_scale)` of a merged projection, or None when not expressible.

    `y = x W^T + b + lora_scale * (x A^T) B^T` must equal what `proj(x)` computes. A plain Linear has no LoRA
    parts (None). A peft `lora.Linear` over a Linear matches peft's forward: adapters disabled or merged -> the
    base layer alone; otherwise its active adapters, several of them as one (A concatenated, B scaled by each
    adapter's scale and concatenated, scale 1). None (the caller then runs `proj(x)` itself) for anything
    this cannot express exactly: hooks on the module, its base layer or its LoRA layers (diffusers' layerwise
    casting or group offloading, accelerate's offload: weights are right only inside their own forward), factors
    in a dtype the op does not compute in (fp8), dropout > 0, DoRA or other LoRA
    variants, LoRA bias, fan_in_fan_out, A and B of different dtypes, or an unknown wrapper. LoRA weights in
    another dtype than the base (fp32 factors on a bf16 model, as mixed-precision training keeps them) are fine:
    the op computes the LoRA part in the factors' dtype, as peft does, and adds it in fp32.
    """
    if has_hooks(proj) or has_hooks(getattr(proj, "base_layer", None)):
        return None
    if type(proj) is nn.Linear:
        return proj.weight, proj.bias, None, None, 1.0
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None
    if type(proj) is not LoraLinear or type(proj.base_layer) is not nn.Linear:
        return None
    base = proj.base_layer
    if proj.disable_adapters or proj.merged:
        # peft unmerges a merged layer when adapters get disabled: a state change we leave to peft
        return (base.weight, base.bias, None, None, 1.0) if not (proj.disable_adapters and proj.merged) else None
    if getattr(proj, "fan_in_fan_out", False):
        return None
    active = [a for a in proj.active_adapters if a in proj.lora_A]
    for a in active:
        if (not isinstance(proj.lora_dropout[a], nn.Identity) or a in getattr(proj, "lora_variant", {})
                or proj.use_dora.get(a, False) or proj.lora_B[a].bias is not None
                or has_hooks(proj.lora_A[a]) or has_hooks(proj.lora_B[a])
                or proj.lora_A[a].weight.dtype != proj.lora_B[a].weight.dtype
                or proj.lora_A[a].weight.dtype not in _KERNEL_DTYPES):
            return None
    if not active:
        return base.weight, base.bias, None, None, 1.0
    if len({proj.lora_A[a].weight.dtype for a in active}) > 1:
        return None
    if len(active) == 1:
        a = active[0]
        return base.weight, base.bias, proj.lora_A[a].weight, proj.lora_B[a].weight, float(proj.scaling[a])
    lora_a = torch.cat([proj.lora_A[a].weight for a in active])
    lora_b = torch.cat([proj.lora_B[a].weight * proj.scaling[a] for a in active], dim=1)
    return base.weight, base.bias, lora_a, lora_b, 1.0


# factor dtypes the op computes in; any other (fp8 stored by layerwise casting, ...) runs the module's own forward
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def has_hooks(module) -> bool:
    """True when `module` carries forward hooks (torch's, diffusers' HookRegistry or accelerate's): its weights
    are then only what its forward sees inside its own call."""
    if module is None:
        return False
    registry = getattr(module, "_diffusers_hook", None)
    return (bool(registry is not None and registry._hook_order) or hasattr(module, "_hf_hook")
            or bool(module._forward_pre_hooks) or bool(module._forward_hooks))
