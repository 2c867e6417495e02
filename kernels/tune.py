"""Measure both Triton forwards on this GPU and write its dispatch table (see dispatch.py for the format).

    python -m qwen_fused.kernels.tune --out kernels/tuning/ [--rows 1024,4096,8192,16384] [--ranks 0,64]
                                      [--dtypes bfloat16] [--width 3072 --heads 24 --head-dim 128]

For each (dtype, LoRA rank, rows) it times `fused_qkv` forced to `fused` and to `gemm` in this one process
(triton.testing.do_bench medians, same inputs, Qwen-Image width with QK norms and RoPE), checks that the two
agree, and records the faster. The table goes to `<out>/<gpu-slug>.json`, replacing the previous one; commit it.
Needs CUDA: timings from the interpreter would mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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


def measure(rows, rank, dtype, width, heads, head_dim) -> dict:
    """{impl: median ms} for one key, after checking that both forwards give the same q, k, v."""
    from triton.testing import do_bench

    x, w, kw = _inputs(rows, rank, dtype, width, heads, head_dim)
    ms, outs = {}, {}
    with torch.no_grad():
        for impl in IMPLS:
            set_backend(f"triton-{impl}")
            try:
                outs[impl] = fused_qkv(x, w, **kw)
                ms[impl] = do_bench(lambda: fused_qkv(x, w, **kw), return_mode="median")
            finally:
                set_backend(None)
    for a, b in zip(*outs.values()):
        err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
        if not err < 0.02:  # a few roundings of bf16 apart at most; more is a broken kernel, not a timing
            raise RuntimeError(f"tune: fused and gemm disagree at rows={rows} rank={rank} {dtype} (max rel {err:.2e})")
    return ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_fused.kernels.tune", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for <gpu-slug>.json (the repo's kernels/tuning/)")
    p.add_argument("--rows", type=_ints, default=[1024, 4096, 8192, 16384], help="B * S per call, comma-separated")
    p.add_argument("--ranks", type=_ints, default=[0, 64], help="LoRA ranks (0: no LoRA)")
    p.add_argument("--dtypes", default="bfloat16", help=f"comma-separated, of {', '.join(dispatch.DTYPE_NAMES)}")
    p.add_argument("--width", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("qwen_fused.kernels.tune needs a CUDA GPU: it times the Triton kernels on the GPU whose "
                         "table it writes, and no CUDA device is visible here")
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in dispatch.DTYPE_NAMES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {', '.join(dispatch.DTYPE_NAMES)}")
    import triton

    gpu = torch.cuda.get_device_name()
    choices = []
    for name in dtypes:
        for rank in args.ranks:
            for rows in args.rows:
                ms = measure(rows, rank, dispatch.DTYPE_NAMES[name], args.width, args.heads, args.head_dim)
                impl = min(ms, key=ms.get)
                choices.append(dict(dtype=name, rank=rank, rows=rows, impl=impl,
                                    ms={k: round(v, 4) for k, v in ms.items()}))
                print(f"{name} rank {rank:3d} rows {rows:6d}: " + "  ".join(f"{k} {v:.4f} ms" for k, v in ms.items())
                      + f"  -> {impl}", flush=True)
    table = dict(gpu=gpu, tuned=dict(torch=torch.__version__, triton=triton.__version__,
                                     shape=dict(width=args.width, heads=args.heads, head_dim=args.head_dim),
                                     timer="triton.testing.do_bench median, forward, no grad"),
                 choices=choices)
    dispatch.parse_table(table)  # never write a table the dispatcher would refuse
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dispatch.slug(gpu)}.json"
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
