"""The run of `qwen-fused check` (its options, without torch: check_cli.py): stock diffusers vs fused, side by side,
each against a float64 run, for outputs and gradients; non-zero exit if fused is further from float64 than stock."""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from math import prod

import torch

from . import check_cli
from .cli_util import quiet_diffusers, resolve_device
from .families import family_of
from .families import qwenimage21 as q21
from .fuse import fuse_qkv
from .numerics import rel_err
from .tiny import random_transformer

DTYPES = {name: getattr(torch, dtype) for name, dtype in check_cli.DTYPES.items()}
# fused may be this much further from float64 than stock before the check fails (max, RMS): a relative margin
# for rounding noise plus an absolute floor of a few fp32 epsilons. Every path accumulates in fp32, whose summation
# order changes with the thread count (on 2 CPU threads one fp32 gradient was 1.0e-6 from float64 for stock and
# 1.4e-6 for fused, 8 and 12 fp32 eps; on 1 thread it passed the relative margin alone).
MARGIN, FLOOR_EPS32 = {"fp32": (1.25, 1.25), "16-bit": (2.0, 1.25)}, 4
# In bf16/fp16 a tiny case pools its errors over SEEDS16 random models and inputs: one seed's ratio to stock
# scattered up to 1.26 (RMS) and 1.87 (max) with nothing wrong. Pooled, on CPU (4 base seeds x 4 tiny cases), it
# was at most 1.08 RMS and 1.42 max, while scaling to_qkv's weights by 1 + 1/64 gave 1.19-1.24 RMS, by 1 + 1/32
# more (the max is one element: noisy, hence its wider margin).
SEEDS16 = 8


@dataclass
class Case:
    name: str
    config: dict
    batch: int
    txt_len: int
    img_shapes: tuple  # one sample's [(1, h, w), ...]: target then edit images
    valid_lens: tuple | None = None
    attn_grads_only: bool = False  # weight gradients of the attention only (keeps the CPU run short)
    layout21: dict | None = None  # Qwen-Image 2.1: `tiny21.random_inputs`'s text/conditions/target/pad (then
    #                               config is `tiny21.random_transformer`'s, and txt_len/img_shapes are unused)
    seeds16: int = SEEDS16  # in bf16/fp16, errors pooled over this many random models and inputs


def tiny_cases():
    base = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, joint_attention_dim=24)
    return [
        Case("tiny 3x32, 2 edits, text mask", dict(base, attention_head_dim=32, num_attention_heads=3,
                                                    axes_dims_rope=(8, 12, 12)),
             batch=2, txt_len=9, img_shapes=((1, 4, 6), (1, 4, 4), (1, 3, 5)), valid_lens=(9, 4)),
        Case("tiny 2x128, zero_cond_t, S_txt=1", dict(base, attention_head_dim=128, num_attention_heads=2,
                                                       axes_dims_rope=(16, 56, 56), zero_cond_t=True),
             batch=1, txt_len=1, img_shapes=((1, 5, 3), (1, 4, 4))),
    ]


def tiny21_cases():
    """Qwen-Image 2.1 (single stream, block-causal attention; empty when diffusers has no 2.1)."""
    if q21.model_class() is None:
        return []
    return [
        Case("2.1 tiny 2x32, 2 conditions, text mask", dict(attention_head_dim=32), batch=2, txt_len=0,
             img_shapes=(), layout21=dict(text=(3, 2, 2), conditions=((1, 4, 4), (1, 2, 4)), target=(1, 4, 6),
                                          pad=(0, 2))),
        Case("2.1 tiny 2x128, text-to-image", dict(attention_head_dim=128), batch=1, txt_len=0, img_shapes=(),
             layout21=dict(text=(5,), conditions=(), target=(1, 4, 4))),
    ]


def real_width21_case(device):
    """One 2.1 block at real width (4096 = 32 x 128, random weights); an edit sized to the device."""
    if q21.model_class() is None:
        return []
    cfg = dict(num_layers=1, attention_head_dim=q21.HEAD_DIM, num_attention_heads=q21.HEADS,
               in_channels=q21.IN_CHANNELS, out_channels=q21.IN_CHANNELS, context_in_dim=q21.CONTEXT_DIM)
    if device.type == "cuda":  # a 1024x1024 target and one 1024x1024 condition image, 128 text tokens
        return [Case("2.1 real width 32x128, edit 1024 (S 8320)", cfg, 1, 0, (), seeds16=1,
                     layout21=dict(text=(8, 120), conditions=((1, 64, 64),), target=(1, 64, 64)))]
    return [Case("2.1 real width 32x128, small edit (S 52)", cfg, 1, 0, (), attn_grads_only=True, seeds16=1,
                 layout21=dict(text=(3, 9), conditions=((1, 4, 4),), target=(1, 4, 6)))]


def real_width_case(device):
    """One block at real width (3072 = 24 x 128, random weights); an edit shape sized to the device."""
    cfg = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
    if device.type == "cuda":  # 1024x1024 target + one 1024x1024 edit image, a long prompt
        return Case("real width 24x128, edit 1024 (S_img 8192, S_txt 512)", cfg, 1, 512, ((1, 64, 64),) * 2,
                    seeds16=1)
    return Case("real width 24x128, small edit (S_img 136, S_txt 29)", cfg, 1, 29, ((1, 8, 9), (1, 8, 8)),
                attn_grads_only=True, seeds16=1)


def _build(case: Case, device, seed):
    if case.layout21 is not None:
        from .families.tiny21 import random_transformer as random21

        model = random21(seed, device=device, **case.config)
    else:
        model = random_transformer(seed, device=device, **case.config)
    if case.attn_grads_only:
        for name, p in model.named_parameters():
            p.requires_grad_(".attn." in name)
    return model


def _inputs(case: Case, model, device, seed):
    if case.layout21 is not None:
        from .families.tiny21 import random_inputs

        kw = random_inputs(model, batch=case.batch, seed=seed, **case.layout21)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    g = torch.Generator(device="cpu").manual_seed(seed)
    s_img = sum(prod(s) for s in case.img_shapes)
    cfg = model.config
    kw = dict(
        hidden_states=torch.randn(case.batch, s_img, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(case.batch, case.txt_len, cfg.joint_attention_dim, generator=g),
        timestep=torch.rand(case.batch, generator=g),
    )
    kw = {k: v.to(device) for k, v in kw.items()}
    kw["img_shapes"] = [list(case.img_shapes)] * case.batch
    if case.valid_lens is not None:
        mask = torch.zeros(case.batch, case.txt_len, dtype=torch.bool)
        for i, n in enumerate(case.valid_lens):
            mask[i, :n] = True
        kw["encoder_hidden_states_mask"] = mask.to(device)
    return kw


def _run(model, inputs, dtype, grad_out):
    """Forward + backward; returns {quantity: float64 tensor} for the output and every gradient."""
    kw = {k: (v.detach().to(dtype).requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in inputs.items()}
    out = model(**kw).sample
    out.backward(grad_out.to(out.dtype))
    res = {"output": out.detach().double(),
           "grad hidden_states": kw["hidden_states"].grad.double(),
           "grad encoder_hidden_states": kw["encoder_hidden_states"].grad.double()}
    qkv, other = [], []
    family = family_of(model)
    streams, extra = family.STREAMS, getattr(family, "MERGED_LINEARS", {})
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if any(f".{leaf}." in name for merged, parts in streams.items() for leaf in (merged, *parts)):
            qkv.append((_stock_order_key(name, streams), p.grad.double().flatten()))
            continue
        # an opt-in merged projection (2.1's img_mlp.gate_up): its row blocks under the stock parts' names
        merged = next((m for m in extra if f".{m}." in name), None)
        parts = extra[merged][0] if merged else (None,)
        for part, g in zip(parts, p.grad.chunk(len(parts))):
            other.append((name.replace(merged, part) if part else name, g.double().flatten()))
    res["grad q/k/v weights+biases"] = torch.cat([g for _, g in sorted(qkv, key=lambda t: t[0])])
    res["grad other parameters"] = torch.cat([g for _, g in sorted(other, key=lambda t: t[0])])
    return res


def _stock_order_key(name, streams):
    """Sort key that lines up fused to_qkv rows with stock to_q, to_k, to_v (same for the text stream)."""
    for merged, parts in streams.items():
        for i, part in enumerate(parts):
            name = name.replace(f".{part}.", f".{merged}.{i}.")
    block, _, rest = name.partition(".attn.")
    stream, _, rest = rest.partition(".")
    idx, _, leaf = rest.partition(".") if rest[:1].isdigit() else ("", "", rest)
    return (block, stream, leaf, idx)


def _margin(dt):
    return MARGIN["16-bit" if dt.itemsize < 4 else "fp32"]


def _one_seed(case: Case, device, dt, seed, fuse):
    """{quantity: float64 tensor} of the float64, stock and fused (`fuse(stock copy)`) runs of `case` at `seed`."""
    # The float64 run gets the very weights, inputs and output gradient that the dt runs get (rounded to dt,
    # then widened exactly), so each error is the arithmetic of one run alone. Given unrounded data instead,
    # bf16's input rounding dominated both errors alike: a 6% scale error on to_qkv's weights passed.
    with quiet_diffusers():
        stock = _build(case, device, seed).to(dt)
        inputs = {k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in _inputs(case, stock, device, seed + 1).items()}
        ref64 = copy.deepcopy(stock).double()
        fused = (fuse or fuse_qkv)(copy.deepcopy(stock))
    with torch.no_grad():
        probe = ref64(**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                         for k, v in inputs.items()}).sample
    grad_out = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed + 2)).to(dt).to(device)
    r = _run(ref64, inputs, torch.float64, grad_out)
    del ref64
    s = _run(stock, inputs, dt, grad_out)
    del stock
    return r, s, _run(fused, inputs, dt, grad_out)


def run_check(device="cpu", dtype="fp32", real_width=True, seed=0, verbose=True, cases=None, fuse=None):
    """Run every case (or `cases`); returns (rows, ok). Each row: case, quantity, fused/stock, stock/f64,
    fused/f64, ok. `fuse(model) -> model` makes the fused model (default `fuse_qkv`; e.g. with `fuse_swiglu`)."""
    device = torch.device(device)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    floor = FLOOR_EPS32 * torch.finfo(torch.float32).eps
    margin = _margin(dt)
    if cases is None:
        cases = tiny_cases() + ([real_width_case(device)] if real_width else []) + tiny21_cases() + \
            (real_width21_case(device) if real_width else [])
    rows, ok = [], True
    for case in cases:
        t0 = time.time()
        runs = [_one_seed(case, device, dt, seed + 3 * i, fuse)
                for i in range(case.seeds16 if _margin(dt) is MARGIN["16-bit"] else 1)]
        for q in runs[0][0]:
            r, s, f = (torch.cat([run[j][q].flatten() for run in runs]) for j in range(3))
            fs, sr, fr = rel_err(f, s), rel_err(s, r), rel_err(f, r)
            good = all(fr[i] <= margin[i] * sr[i] + floor for i in (0, 1))
            ok &= good
            rows.append((case.name, q, fs, sr, fr, good))
        if verbose:
            print(f"  {case.name}: {time.time() - t0:.1f}s", flush=True)
    if any(c.attn_grads_only for c in cases):
        print("  (real-width case on CPU: weight gradients of the attention only; the tiny cases check all)")
    return rows, ok


def format_table(rows) -> str:
    head = ("case", "quantity", "fused vs stock max/rms", "stock vs f64 max/rms", "fused vs f64 max/rms", "")
    fmt = lambda e: f"{e[0]:.2e} / {e[1]:.2e}"  # noqa: E731
    body = [(c, q, fmt(fs), fmt(sr), fmt(fr), "ok" if good else "WORSE") for c, q, fs, sr, fr, good in rows]
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in body])


def run_command(args) -> int:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolve_device(args.device)
    except ValueError as e:
        print(f"qwen-fused check: error: {e}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    sixteen = _margin(DTYPES[dtype]) is MARGIN["16-bit"]
    print(f"qwen-fused check on {args.device}, {dtype}: stock diffusers vs fused, each vs a float64 run on the "
          f"same {dtype} weights and inputs" + (f" (tiny cases: {SEEDS16} seeds pooled)" if sixteen else ""))
    rows, ok = run_check(args.device, dtype, real_width=not args.no_real_width, seed=args.seed)
    print(format_table(rows))
    m_max, m_rms = _margin(DTYPES[dtype])
    allowed = (f"{m_max:g}x (max) / {m_rms:g}x (RMS) stock's error vs float64 + {FLOOR_EPS32} fp32 eps "
               f"({FLOOR_EPS32 * torch.finfo(torch.float32).eps:.1e})")
    print(f"\nPASS: fused is within {allowed} on every row (rounding noise: fused may be slightly further than "
          f"stock on some rows)" if ok else
          f"\nFAIL: fused is further from float64 than {allowed} on the rows marked WORSE")
    return 0 if ok else 1
