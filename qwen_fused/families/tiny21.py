"""Tiny random Qwen-Image 2.1 transformers and their inputs (tests; later check and bench).

The weights follow `qwen_fused.tiny.random_transformer`'s scheme (that module is the Qwen-Image family's builder
and sits in a layer above this one): N(0, 1/fan_in) weights, norm weights U(0.5, 1.5), so that every parameter
matters (a norm weight of exactly 1, or 2.1's zero-centred text norm at 0, would hide a missing multiply).
"""
from __future__ import annotations

from math import prod

import torch

from ..numerics import random_parameters

TINY_CONFIG = dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=32,
                   num_attention_heads=2, context_in_dim=16, mlp_ratio=3)
TOKENS_PER_SLOT = 4  # one vision-language image slot stands for 2x2 latent tokens (diffusers' _IMG_TOKENS_PER_SLOT)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (frame, height, width) that sum to `head_dim`: the real model's (16, 56, 56) at 128."""
    return (16, 56, 56) if head_dim == 128 else (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)


def random_transformer(seed: int = 0, *, dtype=torch.float32, device="cpu", **config):
    """A `QwenImage21Transformer2DModel` (`TINY_CONFIG` updated by `config`; `axes_dims_rope` follows
    `attention_head_dim` unless given) with random weights (`numerics.random_parameters`), in eval mode."""
    from accelerate import init_empty_weights
    from diffusers import QwenImage21Transformer2DModel

    config = {**TINY_CONFIG, **config}
    config.setdefault("axes_dims_rope", rope_axes(config["attention_head_dim"]))
    with init_empty_weights(include_buffers=False):
        model = QwenImage21Transformer2DModel(**config)
    # every 1-d parameter of 2.1 is a norm weight (it has no biases): drawn as Qwen-Image's norm weights are
    return random_parameters(model, seed, dtype, device).to(device).eval()


def random_inputs(model, *, batch=2, text=(3, 2), conditions=((1, 4, 4),), target=(1, 4, 6), pad=None, seed=1,
                  dtype=torch.float32, requires_grad=False):
    """Inputs of `model.forward` as `QwenImage21Pipeline` lays them out.

    The text stream is `text[0]` tokens, condition image 1's slots, `text[1]` tokens, ... (one more text run than
    condition images), then the target image's slots; each slot stands for 2x2 latent tokens, so every image's
    `h * w` is a multiple of 4. `hidden_states` holds the condition images' latents first, the target's last.
    `pad[i]` masks sample i's last `pad[i]` text tokens (`encoder_hidden_states_mask`).
    """
    if len(text) != len(conditions) + 1:
        raise ValueError(f"random_inputs: {len(conditions)} condition images need {len(conditions) + 1} text runs, "
                         f"got {len(text)}")
    images = [*conditions, target]
    if any(prod(s) % TOKENS_PER_SLOT for s in images):
        raise ValueError(f"random_inputs: every image's tokens must fill 2x2 slots, got {images}")
    slots = [prod(s) // TOKENS_PER_SLOT for s in images]
    row = []
    for n_text, n_slots in zip(text, slots[:-1]):
        row += [False] * n_text + [True] * n_slots
    row += [False] * text[-1]
    s_txt = len(row)  # the vision-language sequence: text and condition-image slots
    row += [True] * slots[-1]
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, sum(prod(s) for s in images), cfg.in_channels, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, s_txt, cfg.context_in_dim, generator=g, dtype=dtype),
        timestep=torch.rand(batch, generator=g, dtype=dtype),
        img_shapes=[list(images)] * batch,
        img_mask=torch.tensor([row] * batch),
    )
    if pad is not None:
        text_positions = [i for i, is_slot in enumerate(row[:s_txt]) if not is_slot]
        mask = torch.ones(batch, s_txt, dtype=torch.bool)
        for i, n in enumerate(pad):
            if n:
                mask[i, text_positions[-n:]] = False
        kw["encoder_hidden_states_mask"] = mask
    if requires_grad:
        kw["hidden_states"].requires_grad_(True)
        kw["encoder_hidden_states"].requires_grad_(True)
    return kw
