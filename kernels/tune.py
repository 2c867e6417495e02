"""Measure both Triton forwards on this GPU and write its dispatch table (see dispatch.py for the format).

    python -m qwen_fused.kernels.tune --out kernels/tuning/ [--rows 1024,4096,8192,16384] [--ranks 0,64]
                                      [--dtypes bfloat16] [--width 3072 --heads 24 --head-dim 128]
                                      [--rounds 4] [--margin 0.03]

For each (dtype, LoRA rank, rows) it checks that `fused_qkv` forced to `fused` and to `gemm` agree, then times
both in this one process (same inputs, Qwen-Image width with QK norms and RoPE): `--rounds` rounds of one
`triton.testing.do_bench` median each, the order alternating per round (fused gemm, gemm fused, ...), so that
whatever the first or second position costs (clocks, cache state) falls on both alike. `gemm` replaces the
default `fused` only when the median of its medians is at least `--margin` (3%) faster: a table must not switch
routes on noise. Every median is kept in the entry (`rounds_ms`).

The table goes to `<out>/<gpu-slug>.json`, replacing the previous one; commit it. While it runs, the keys done so
far are in `<out>/<gpu-slug>.partial.json` (which the dispatcher never reads), so a run cut by a time limit keeps
them. Needs CUDA: timings from the interpreter would mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import dispatch
from .backend import IMPLS, set_backend
from .fused_qkv import fused_qkv


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def _inputs(rows, rank, dtype, width, heads, head_dim):
    n = 3 * heads * head_dim
    ang = torch.rand(rows, head_dim // 2, device="cuda") * 6.3

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda") * scale).to(dtype)

    kw = dict(bias=rnd(n, scale=0.1), heads=heads, norm_q=rnd(head_dim).abs() + 0.5,
              norm_k=rnd(head_dim).abs() + 0.5, cos=ang.cos(), sin=ang.sin(), lora_scale=0.5)
    if rank:
        kw.update(lora_a=rnd(rank, width, scale=width ** -0.5), lora_b=rnd(n, rank, scale=0.05))
    return rnd(1, rows, width), rnd(n, width, scale=width ** -0.5), kw


MARGIN = 0.03  # a fraction: switching the route off the default must be worth more than run-to-run noise


def round_orders(impls, rounds):
    """The timing order of each round: impls, reversed, impls, ... (ABBA). With an even number of rounds each
    impl is timed first as often as second."""
    impls = list(impls)
    return [impls if r % 2 == 0 else impls[::-1] for r in range(rounds)]


def time_rounds(impls, rounds, time_one) -> dict:
    """{impl: [one median ms per round]}, calling `time_one(impl)` (one median) in `round_orders` order."""
    out = {impl: [] for impl in impls}
    for order in round_orders(impls, rounds):
        for impl in order:
            out[impl].append(float(time_one(impl)))
    return out


def decide(rounds_ms: dict, margin: float = MARGIN, default: str = dispatch.DEFAULT) -> str:
    """The impl of one key from its round medians: `default` unless another impl's median of medians is at least
    `margin` (a fraction) below the default's; then the fastest such."""
    med = {impl: statistics.median(v) for impl, v in rounds_ms.items()}
    best = min(med, key=med.get)
    return best if med[best] <= (1.0 - margin) * med[default] else default


def choice(dtype: str, rank: int, rows: int, rounds_ms: dict, margin: float = MARGIN) -> dict:
    """The table entry of one key: the decision, each impl's median of medians (`ms`) and every median."""
    return dict(dtype=dtype, rank=rank, rows=rows, impl=decide(rounds_ms, margin),
                ms={k: round(statistics.median(v), 4) for k, v in rounds_ms.items()},
                rounds_ms={k: [round(x, 4) for x in v] for k, v in rounds_ms.items()})


def measure(rows, rank, dtype, width, heads, head_dim, rounds) -> dict:
    """{impl: [median ms per round]} for one key, after checking that both forwards give the same q, k, v."""
    from triton.testing import do_bench

    x, w, kw = _inputs(rows, rank, dtype, width, heads, head_dim)

    def forced(impl, fn):
        set_backend(f"triton-{impl}")
        try:
            return fn()
        finally:
            set_backend(None)

    with torch.no_grad():
        # the first call of each also compiles it, outside the timed rounds
        outs = {impl: forced(impl, lambda: fused_qkv(x, w, **kw)) for impl in IMPLS}
        for a, b in zip(*outs.values()):
            err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
            if not err < 0.02:  # a few roundings of bf16 apart at most; more is a broken kernel, not a timing
                raise RuntimeError(f"tune: fused and gemm disagree at rows={rows} rank={rank} {dtype} "
                                   f"(max rel {err:.2e})")
        outs = None
        return time_rounds(IMPLS, rounds, lambda impl: forced(
            impl, lambda: do_bench(lambda: fused_qkv(x, w, **kw), return_mode="median")))


def _write(path: Path, table: dict) -> None:
    """Whole or not at all: a temporary beside `path`, then one rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_fused.kernels.tune", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for <gpu-slug>.json (the repo's kernels/tuning/)")
    p.add_argument("--rows", type=_ints, default=[1024, 4096, 8192, 16384], help="B * S per call, comma-separated")
    p.add_argument("--ranks", type=_ints, default=[0, 64], help="LoRA ranks (0: no LoRA)")
    p.add_argument("--dtypes", default="bfloat16", help=f"comma-separated, of {', '.join(dispatch.DTYPE_NAMES)}")
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4,
                   help="timed rounds per impl, order alternating; even, so each impl goes first equally often")
    p.add_argument("--margin", type=float, default=MARGIN,
                   help=f"fraction by which gemm must beat {dispatch.DEFAULT} to be chosen (default {MARGIN})")
    args = p.parse_args(argv)
    if args.rounds < 2 or args.rounds % 2:
        p.error(f"--rounds must be even and at least 2 (got {args.rounds}): each impl then goes first as often "
                f"as second")
    if not 0 <= args.margin < 0.5:
        p.error(f"--margin is a fraction in [0, 0.5), got {args.margin}")
    if not torch.cuda.is_available():
        raise SystemExit("qwen_fused.kernels.tune needs a CUDA GPU: it times the Triton kernels on the GPU whose "
                         "table it writes, and no CUDA device is visible here")
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in dispatch.DTYPE_NAMES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {', '.join(dispatch.DTYPE_NAMES)}")
    import triton

    gpu = torch.cuda.get_device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dispatch.slug(gpu)}.json"
    partial = out / f"{dispatch.slug(gpu)}.partial.json"
    keys = [(name, rank, rows) for name in dtypes for rank in args.ranks for rows in args.rows]
    table = dict(gpu=gpu, tuned=dict(torch=torch.__version__, triton=triton.__version__,
                                     shape=dict(width=args.width, heads=args.heads, head_dim=args.head_dim),
                                     timer=f"triton.testing.do_bench median, forward, no grad; {args.rounds} "
                                           f"rounds, order alternating; impl: {dispatch.DEFAULT} unless another "
                                           f"is {args.margin:.0%} faster (median of the round medians)",
                                     date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     keys=len(keys), complete=False),
                 choices=[])
    for name, rank, rows in keys:
        rounds_ms = measure(rows, rank, dispatch.DTYPE_NAMES[name], args.width, args.heads, args.head_dim,
                            args.rounds)
        entry = choice(name, rank, rows, rounds_ms, args.margin)
        table["choices"].append(entry)
        _write(partial, table)  # a run cut by a time limit keeps the keys it finished
        print(f"{name} rank {rank:3d} rows {rows:6d}: "
              + "  ".join(f"{k} {v:.4f} ms {rounds_ms[k]}" for k, v in entry["ms"].items())
              + f"  -> {entry['impl']}", flush=True)
    table["tuned"]["complete"] = True
    dispatch.parse_table(table)  # never write a table the dispatcher would refuse
    _write(path, table)
    partial.unlink(missing_ok=True)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
