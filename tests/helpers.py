"""Shared test utilities: tiny stock models, inputs, error metrics, stock<->merged name mapping."""
from __future__ import annotations

import copy
from math import prod

import torch

from qwen_fused.names import STREAMS
from qwen_fused.numerics import rel_err
from qwen_fused.tiny import TINY_CONFIG, random_transformer, rope_axes


def free_port() -> str:
    """A TCP port free on this machine now, for a test's torch.distributed rendezvous: fixed ports collide when two
    suites run at once (two checkouts' CI on one machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def random_image(size=(56, 40), seed=1, path=None):
    """A random RGB PIL image of `size` (width, height); saved to `path` (returned as str) when given."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))
    if path is None:
        return image
    image.save(path)
    return str(path)


def assert_close(a, b, tol, name=""):
    """Max relative error of `a` against `b` (numerics.rel_err) at most `tol`; returns it."""
    mx, rms = rel_err(a, b)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if mx > tol:
        idx = (a.double() - b.double()).abs().argmax()
        coord = torch.unravel_index(idx, a.shape)
        raise AssertionError(f"{name}: max rel err {mx:.3e} (rms {rms:.3e}) > {tol:.1e} at "
                             f"{tuple(int(c) for c in coord)}: {a.flatten()[idx].item()} vs {b.flatten()[idx].item()}")
    return mx


def tiny_config(heads=3, head_dim=32, layers=2, zero_cond_t=False):
    """The tests' usual transformer config: joint dim 24, RoPE axes for head_dim."""
    return dict(TINY_CONFIG, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
                joint_attention_dim=24, axes_dims_rope=rope_axes(head_dim), zero_cond_t=zero_cond_t)


TINY_CFG = tiny_config()


def tiny_transformer(heads=3, head_dim=32, layers=2, zero_cond_t=False, seed=0, dtype=torch.float32):
    """`qwen_fused.tiny.random_transformer` of `tiny_config(...)`."""
    return random_transformer(seed, dtype=dtype, **tiny_config(heads, head_dim, layers, zero_cond_t))


def tiny_inputs(batch=2, txt_len=7, img_shapes=((1, 4, 6), (1, 4, 4)), valid_lens=None, seed=1,
                dtype=torch.float32, requires_grad=False):
    """Inputs for a tiny transformer: img_shapes is one sample's [(1, h, w), ...] (target first, then edits)."""
    g = torch.Generator().manual_seed(seed)
    s_img = sum(prod(s) for s in img_shapes)
    kw = dict(
        hidden_states=torch.randn(batch, s_img, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, txt_len, 24, generator=g, dtype=dtype),
        timestep=torch.rand(batch, generator=g, dtype=dtype),
        img_shapes=[list(img_shapes)] * batch,
    )
    if valid_lens is not None:
        mask = torch.zeros(batch, txt_len, dtype=torch.bool)
        for i, n in enumerate(valid_lens):
            mask[i, :n] = True
        kw["encoder_hidden_states_mask"] = mask
    if requires_grad:
        kw["hidden_states"].requires_grad_(True)
        kw["encoder_hidden_states"].requires_grad_(True)
    return kw


def clone_inputs(kw):
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else copy.deepcopy(v))
            for k, v in kw.items()}


def merged_view(stock_tensors: dict) -> dict:
    """Stock parameter-name -> tensor dict in merged layout (q/k/v concatenated along dim 0)."""
    out = dict(stock_tensors)
    for merged, parts in STREAMS.items():
        for name in [n for n in stock_tensors if f".attn.{parts[0]}." in n]:
            stem, leaf = name.split(f".attn.{parts[0]}.")
            names = [f"{stem}.attn.{p}.{leaf}" for p in parts]
            out[f"{stem}.attn.{merged}.{leaf}"] = torch.cat([stock_tensors[n] for n in names])
            for n in names:
                del out[n]
    return out
