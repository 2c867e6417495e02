"""Pure-torch path of the block-level ops (private; the reference `_triton_block.py` must match).

Each function is the exact op sequence of stock diffusers' `QwenImageTransformerBlock` (and peft's `lora.Linear`),
so it rounds where stock rounds: after the GEMM, after GELU, after `gate * y`, after the residual add, after
`F.layer_norm`, after `1 + scale`, after the product and after `+ shift`. Plain autograd, any device.
"""
from __future__ import annotations

import torch.nn.functional as F

from ._linear import lora_linear


def linear_gelu(x, weight, bias=None):
    # diffusers FeedForward(activation_fn="gelu-approximate"): GELU.proj then F.gelu(approximate="tanh")
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def linear_gate_residual(x, weight, bias, gate, residual, *, lora_a=None, lora_b=None, lora_scale=1.0):
    # QwenImageTransformerBlock: `hidden_states + gate.unsqueeze(1) * out`
    return residual + gate.unsqueeze(1) * lora_linear(x, weight, bias, lora_a, lora_b, lora_scale)


def modulated_layernorm(x, shift, scale, eps=1e-6):
    # nn.LayerNorm(elementwise_affine=False) then QwenImageTransformerBlock._modulate (no modulate index)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
