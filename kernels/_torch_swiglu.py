"""Pure-torch path of the merged SwiGLU (private; a Triton kernel, when there is one, must match it).

The exact op sequence of stock diffusers' `QwenImage21SwiGLUFeedForward` (with peft's `lora.Linear` on its
projections), so it rounds where stock rounds: after the GEMM, after SiLU, after the product. Plain autograd, any
device. With the projections merged as `cat([gate_layer, proj])` the one GEMM computes both halves; a merged LoRA
whose B is block-diagonal is each part's own LoRA exactly (the other part's rows of B are zero).
"""
from __future__ import annotations

import torch.nn.functional as F

from ._linear import lora_linear


def swiglu(x, weight, bias=None, *, lora_a=None, lora_b=None, lora_scale=1.0):
    # QwenImage21SwiGLUFeedForward: `activation_fn(gate_layer(x)) * proj(x)`, before `out`
    gate, up = lora_linear(x, weight, bias, lora_a, lora_b, lora_scale).chunk(2, dim=-1)
    return F.silu(gate) * up
