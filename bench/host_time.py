"""Host (CPU) time per `joint_qkv` call, forward and backward, on the custom-op route and the direct eager route.

    python -m qwen_fused.bench.host_time [--out FILE.json] [--shapes train-512,edit-1024] [--calls 20]
    python -m qwen_fused.bench.host_time --cpu-smoke      # tiny shapes on CPU: checks the tool, measures nothing

A measurement tool, not a test (issue 10: eager LoRA training at train-512 is host-bound, design.md section 9).
Inputs at real width (3072 = 24 heads x 128, bf16; sequence lengths from bench/cases.py), two cases per shape:
`infer` (no LoRA, no grad: forward only) and `lora-r32` (LoRA r32 on both streams, factors and x requiring grad:
forward and backward). Each case runs both routes: `op` (every call through the `qwen_fused::joint_qkv` custom op,
`fused_qkv.DIRECT = False`) and `direct` (the default eager route).

Two measurements per call, neither of which synchronises inside the timed region:
- timer: `time.perf_counter` around `--calls` calls, median over `--rounds` rounds, synchronising only between
  rounds. For backward the graphs are built first (untimed), then their backward calls are timed
  (`torch.autograd.grad`, so no gradient accumulation kernels). The GPU queue holds the calls' launches, so a
  GPU slower than the host does not show here; `wall` (timer round plus the final synchronisation) does show it.
- profiler: `torch.profiler` (CPU activity only) with a `record_function` range around each call; the range's
  CPU time per call (its ops included; the profiler's own per-op cost makes this higher than the timer), and
  the ops with the most self CPU time inside, in the JSON.

Prints a table and writes JSON (`--out`), rewritten after every row with `complete` false until the last one, so
a run cut by a time limit keeps the rows it finished. Without CUDA it refuses (exit 2) unless `--cpu-smoke`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch

from .cases import REAL_DIMS, SHAPES, SHAPES21, TINY_DIMS, TINY_SEQ_DIV
from .report import atomic_write

LABELS = {"fwd": "host_time::forward", "bwd": "host_time::backward"}


def _streams(shape, lora, device, dtype, tiny, seed=0):
    """txt and img argument dicts of `joint_qkv` at `shape`, as the fused blocks pass them."""
    dims = TINY_DIMS if tiny else REAL_DIMS
    H, D = dims["heads"], dims["head_dim"]
    C = H * D
    s_img, s_txt = SHAPES[shape]
    if tiny:
        s_img, s_txt = max(1, s_img // TINY_SEQ_DIV), max(1, s_txt // TINY_SEQ_DIV)
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    streams = []
    for S in (s_txt, s_img):
        ang = torch.rand(S, D // 2, generator=g, device=device) * 6.3
        table = torch.stack([ang.cos(), ang.sin()], dim=1)  # [S, 2, D//2]: the pos_embed hook's layout
        st = dict(x=rnd(1, S, C), weight=rnd(3 * C, C, scale=C ** -0.5), bias=rnd(3 * C, scale=0.1),
                  norm_q=(torch.rand(D, generator=g, device=device) + 0.5).to(dtype),
                  norm_k=(torch.rand(D, generator=g, device=device) + 0.5).to(dtype), cos=table[:, 0],
                  sin=table[:, 1])
        if lora:
            st.update(lora_a=rnd(lora, C, scale=C ** -0.5).requires_grad_(True),
                      lora_b=rnd(3 * C, lora, scale=0.05).requires_grad_(True), lora_scale=1.0)
            st["x"].requires_grad_(True)  # an upstream LoRA (img_mod / txt_mod) needs dX
        streams.append(st)
    return streams, H


def _timer(fn, calls, rounds, sync):
    """Median host seconds per call over `rounds` rounds of `calls` calls, and the wall seconds per call (with the
    round's final synchronisation)."""
    host, wall = [], []
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls)
        wall.append((t2 - t0) / calls)
    return statistics.median(host), statistics.median(wall)


def _profiled(fn, calls, label):
    """CPU microseconds per call of the `label` range around `fn`, and the top self-CPU ops inside (us per call)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            with record_function(label):
                fn()
    events = prof.key_averages()
    total = next(e.cpu_time_total for e in events if e.key == label)
    top = sorted((e for e in events if e.key != label), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return total / calls, [[e.key, round(e.self_cpu_time_total / calls, 2)] for e in top]


def measure(shape, lora, route, *, device, dtype, tiny, calls, rounds, profile=True) -> dict:
    """One row: host time per forward (and backward with LoRA) call of `joint_qkv` on one route."""
    from qwen_fused.kernels import joint_qkv

    fq = importlib.import_module("qwen_fused.kernels.fused_qkv")  # the module (the package attribute is the op)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    streams, heads = _streams(shape, lora, device, dtype, tiny)
    txt, img = streams
    leaves = [st[k] for st in streams for k in ("x", "lora_a", "lora_b") if k in st and st[k].requires_grad]
    train = bool(leaves)
    prev = fq.DIRECT
    fq.DIRECT = route == "direct"
    try:
        def fwd():
            return joint_qkv(txt, img, heads=heads)

        def fwd_nograd():
            with torch.no_grad():
                return joint_qkv(txt, img, heads=heads)

        f = fwd if train else fwd_nograd
        gouts = [torch.randn(o.shape, device=device, dtype=o.dtype) for o in f()]
        # warm-up: compile the kernels, fill the caching allocator at the sizes the timed rounds hold
        outs = [f() for _ in range(calls)]
        if train:
            for o in outs:
                torch.autograd.grad(o, leaves, gouts)
        outs = None
        sync()
        row = dict(shape=shape, case=f"lora-r{lora}" if lora else "infer", route=route)
        row["fwd_us"], row["fwd_wall_us"] = (round(t * 1e6, 1) for t in _timer(f, calls, rounds, sync))
        if profile:
            row["fwd_prof_us"], row["fwd_prof_top"] = _profiled(f, calls, LABELS["fwd"])
            row["fwd_prof_us"] = round(row["fwd_prof_us"], 1)
        if train:
            host, wall = [], []
            for _ in range(rounds):
                graphs = [f() for _ in range(calls)]
                it = iter(graphs)
                h, w = _timer(lambda: torch.autograd.grad(next(it), leaves, gouts), calls, 1, sync)
                host.append(h)
                wall.append(w)
            row["bwd_us"], row["bwd_wall_us"] = round(statistics.median(host) * 1e6, 1), \
                round(statistics.median(wall) * 1e6, 1)
            if profile:
                graphs = [f() for _ in range(calls)]
                sync()
                it = iter(graphs)
                p, top = _profiled(lambda: torch.autograd.grad(next(it), leaves, gouts), calls, LABELS["bwd"])
                row["bwd_prof_us"], row["bwd_prof_top"] = round(p, 1), top
            graphs = it = None
        sync()
        return row
    finally:
        fq.DIRECT = prev


def _table(rows) -> str:
    cols = [("shape", "shape"), ("case", "case"), ("route", "route"), ("fwd_us", "fwd us"),
            ("fwd_prof_us", "fwd prof us"), ("fwd_wall_us", "fwd wall us"), ("bwd_us", "bwd us"),
            ("bwd_prof_us", "bwd prof us"), ("bwd_wall_us", "bwd wall us")]
    cells = [[h for _, h in cols]] + [[str(r.get(k, "-")) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_fused.bench.host_time", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the rows and the machine's description to this JSON file")
    known = [s for s in SHAPES if s not in SHAPES21]  # Qwen-Image's joint_qkv: the 2.1 shapes are not its
    p.add_argument("--shapes", default="train-512,edit-1024", help=f"comma-separated, of: {', '.join(known)}")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank of the training case (default 32)")
    p.add_argument("--calls", type=int, default=None, help="calls per timed round (default 20; smoke 2)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds, median taken (default 5; smoke 1)")
    p.add_argument("--backend", default="triton", help="QWEN_FUSED_BACKEND for the run (default triton)")
    p.add_argument("--no-profile", action="store_true", help="timer only, no torch.profiler pass")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU (the Triton interpreter if TRITON_INTERPRET=1 works, else the torch "
                        "backend): checks that the tool runs; its numbers mean nothing for a GPU")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in known]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(known)}")
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("qwen_fused.bench.host_time needs a CUDA GPU: it measures the host time of GPU launches. Pass "
              "--cpu-smoke for a tiny CPU run that only checks the tool.", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        # the interpreter must be chosen before triton is first imported (the kernels import it)
        if "triton" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype = torch.device("cpu"), torch.float32  # the interpreter computes bf16 wrongly
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    from qwen_fused.kernels import get_backend, set_backend
    from qwen_fused.kernels.fused_qkv import triton_problem

    backend = args.backend
    if args.cpu_smoke and triton_problem(device, dtype, TINY_DIMS["head_dim"]) is not None:
        backend = "torch"  # no interpreter: both routes are then the torch path
    calls = args.calls or (2 if args.cpu_smoke else 20)
    rounds = args.rounds or (1 if args.cpu_smoke else 5)
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=None, backend=backend, dtype=str(dtype).replace("torch.", ""),
                calls=calls, rounds=rounds, smoke=args.cpu_smoke,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                planned=[[s, case, route] for s in shapes for case in ("infer", f"lora-r{args.rank}")
                         for route in ("op", "direct")], complete=False, rows=[])
    rows = info["rows"]

    def save():  # after every row: a time limit that kills the tool loses only the row in progress
        if args.out:
            info["triton"] = getattr(sys.modules.get("triton"), "__version__", None)  # imported by the kernels
            atomic_write(args.out, json.dumps(info, indent=1) + "\n")

    prev = get_backend()
    set_backend(backend)
    try:
        for shape in shapes:
            for lora in (0, args.rank):
                for route in ("op", "direct"):
                    rows.append(measure(shape, lora, route, device=device, dtype=dtype, tiny=args.cpu_smoke,
                                        calls=calls, rounds=rounds, profile=not args.no_profile))
                    save()
                    print(f"  {shape} {rows[-1]['case']} {route}: fwd {rows[-1]['fwd_us']} us"
                          + (f", bwd {rows[-1]['bwd_us']} us" if "bwd_us" in rows[-1] else ""), file=sys.stderr)
    finally:
        set_backend(prev)
    info["complete"] = True
    save()
    print(_table(rows))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
