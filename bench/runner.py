"""Verify, then time: one run over the selected cases and providers, returned as a JSON-ready dict."""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import torch

from qwen_fused import numerics

from . import model_level, registry, report
from .cases import block_cost
from .registry import PROVIDERS, Case, Unavailable, Workload

# a provider passes when, for every output and gradient, its error against the reference is within
# TOL_FACTOR x stock eager's own error (plus TOL_ABS, for outputs where stock happens to be very close)
TOL_FACTOR = 2.0
TOL_ABS = 2e-3
QUANTILES = [0.5, 0.2, 0.8]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- machine facts
def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit():
    """HEAD of the checkout this package runs from (`-dirty` with local edits); `QWEN_FUSED_COMMIT` overrides,
    for copies without git (the offline GPU machines)."""
    if os.environ.get("QWEN_FUSED_COMMIT"):
        return os.environ["QWEN_FUSED_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return rev.stdout.strip()[:12] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return _head_from_files(here) or "unknown"


def _head_from_files(start: Path):
    """Read .git/HEAD without git (a copied tree may carry .git but no git binary)."""
    for d in (start, *start.parents):
        head = d / ".git" / "HEAD"
        if head.is_file():
            ref = head.read_text().strip()
            if not ref.startswith("ref: "):
                return ref[:12]
            name = ref[5:]
            loose = d / ".git" / name
            if loose.is_file():
                return loose.read_text().strip()[:12]
            packed = d / ".git" / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + name):
                        return line.split()[0][:12]
            return None
    return None


def device_info(device) -> dict:
    device = torch.device(device)
    if device.type != "cuda":
        return {"gpu": None, "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"}
    props = torch.cuda.get_device_properties(device)
    driver = "unknown"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0 and q.stdout.strip():
            driver = q.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": props.name, "device": props.name, "driver": driver, "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "memory_gb": round(props.total_memory / 2**30, 1), "l2_mb": getattr(props, "L2_cache_size", 0) / 2**20}


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            **{p: _version(p) for p in ("triton", "diffusers", "peft", "qwen-fused")}}


# --------------------------------------------------------------------------------------------- timing
def bench_fn(fn, device, grads=(), quick=False):
    """(median, p20, p80) milliseconds of `fn()`; CUDA: triton do_bench (events, L2 flushed between runs)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, warmup=10 if quick else 25, rep=60 if quick else 200, grad_to_none=list(grads),
                              quantiles=QUANTILES))
    fn()
    times = []
    for _ in range(3 if quick else 7):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def _public_argv(argv):
    """The command line, without the folders it wrote to (paths of the measuring machine)."""
    out, hide = [], False
    for a in argv:
        out.append("<path>" if hide else a)
        hide = a in ("--out", "--results-dir")
    return [a.split("=", 1)[0] + "=<path>" if a.startswith(("--out=", "--results-dir=")) else a for a in out]


def measure_ceilings(device, quick=False) -> dict:
    """bf16 matmul rate (8192^3 on CUDA) and device copy bandwidth (bytes read + written), measured now."""
    cuda = torch.device(device).type == "cuda"
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench_fn(lambda: a @ b, device, quick=quick)[0]
    elems = (1 << 29) if cuda else (1 << 24)  # 1 GiB / 32 MiB of bf16
    src = torch.randn(elems, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cms = bench_fn(lambda: dst.copy_(src), device, quick=quick)[0]
    out = {"matmul_tflops": 2 * n**3 / ms / 1e9, "matmul_n": n,
           "copy_tbps": 2 * src.numel() * src.element_size() / cms / 1e9, "copy_bytes": 2 * src.numel() * 2}
    del a, b, src, dst
    return out


def case_cost(w: Workload) -> dict:
    """Minimum FLOPs and device-memory bytes of one case (each input read once, each output written once)."""
    c = w.case
    if c.family == "qwenimage21":
        from .family21 import case_cost as cost21

        return cost21(w)
    B, C, r = c.batch, w.dim, c.rank
    M = B * (w.s_img + w.s_txt)
    e = torch.finfo(w.dtype).bits // 8
    if c.level == "op":
        N = 3 * C
        flops = 2 * M * C * N + (2 * M * r * (C + N) if r else 0)
        nbytes = e * (M * C + 2 * N * C + M * N)
        if c.mode == "fwdbwd":  # dX = dY W, LoRA grads; frozen W, so no dW
            flops += 2 * M * N * C + 4 * M * r * (C + N)
            nbytes += e * (M * N + 2 * N * C + 2 * M * C)
        return {"flops": flops, "bytes": nbytes}
    S = w.s_img + w.s_txt
    lin = 2 * M * C * 12 * C           # qkv 3C + out C + mlp 4C + 4C per token
    att = 4 * B * S * S * C            # QK^T and PV
    weights = e * 2 * 18 * C * C       # both streams: 12 C^2 linear + 6 C^2 modulation
    acts = e * 2 * M * C               # block input and output
    return block_cost(c, lin, att, weights, acts)


# ---------------------------------------------------------------------------------------- verification
def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| (`qwen_fused.numerics.rel_err`'s RMS part): what the verification compares."""
    return numerics.rel_err(a, ref)[1]


def compare(outs: dict, ref: dict) -> dict:
    missing = sorted(set(ref) - set(outs))
    if missing:
        raise ValueError(f"missing outputs/gradients {missing}")
    return {k: rel_err(outs[k].to(ref[k].device), ref[k]) for k in ref}


def judge(errs: dict, stock_errs: dict) -> tuple[bool, str]:
    bad = [(k, e, stock_errs[k]) for k, e in errs.items()
           if not e <= max(TOL_FACTOR * stock_errs[k], stock_errs[k] + TOL_ABS)]
    if not bad:
        return True, ""
    k, e, s = max(bad, key=lambda t: t[1])
    return False, f"{len(bad)} of {len(errs)} outputs off; worst {k}: rel err {e:.3g} vs stock's {s:.3g}"


# ------------------------------------------------------------------------------------------- one case
def run_case(case: Case, providers: list[str], device, tiny=False, quick=False, ceilings=None, seed=0,
             prefix="", on_partial=None) -> dict:
    """One case's record. A model case (minutes long) calls `on_partial(res)` with its providers so far after each
    group of them is timed."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch._dynamo.reset()  # a fresh compile cache per case: no recompile-limit fallbacks to eager
        l2 = torch.cuda.get_device_properties(device).L2_cache_size or (50 << 20)
    else:
        l2 = 50 << 20
    providers = [p for p in providers if case.family in PROVIDERS[p].families]  # e.g. fuse_blocks: Qwen-Image
    if case.level == "model":
        return _run_model_case(case, providers, device, tiny, quick, ceilings, seed, prefix, on_partial)
    log(f"{prefix}{case.name}: building (random weights, {'tiny' if tiny else 'real'} width)")
    if case.family == "qwenimage21":
        from .family21 import Workload21 as make
    else:
        make = Workload
    w = make(case, device, tiny=tiny, seed=seed, l2_bytes=l2)
    cost = case_cost(w)
    res = {"case": case.name, "level": case.level, "shape": case.shape, "batch": case.batch, "mode": case.mode,
           "rank": case.rank, "gc": case.gc, "blocks": case.blocks, "s_img": w.s_img, "s_txt": w.s_txt,
           "dim": w.dim, "heads": w.heads, "input_sets": len(w.inputs), **cost, "providers": {}}
    if ceilings:
        _floor(res, ceilings)
    ref = registry.build_reference(w).collect(w.inputs[0])
    ref = {k: v.detach().clone() for k, v in ref.items()}
    w.release_reference()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    stock_errs = None
    for name in providers:
        entry = res["providers"][name] = {"label": PROVIDERS[name].label}
        try:
            entry.update(_run_provider(w, name, ref, stock_errs, device, quick))
        except Unavailable as e:
            entry.update(status="unavailable", reason=str(e))
        except Exception as e:  # noqa: BLE001 - one failing provider must not end the run
            msg = " ".join(str(e).split())  # one line: it goes into tables
            entry.update(status="error", reason=f"{type(e).__name__}: {msg[:300]}")
        if name == "stock":
            stock_errs = entry.get("errors")
        registry.use_backend_reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        log(f"{prefix}{case.name}: {name:14s} {_line(entry)}")
    _ratios(res)
    return res


def _run_model_case(case, providers, device, tiny, quick, ceilings, seed, prefix, on_partial=None) -> dict:
    """The whole transformer, one model for all providers (bench/model_level.py)."""
    res = {"case": case.name, "level": case.level, "shape": case.shape, "batch": case.batch, "mode": case.mode,
           "rank": case.rank, "gc": case.gc, "blocks": case.blocks, "providers": {}}
    model_level.run_model_case(case, providers, device, tiny, quick, seed, res, judge, compare, log, prefix,
                               on_group=(lambda: on_partial(res)) if on_partial else None)
    for entry in res["providers"].values():
        if "ms" in entry and res["blocks_run"] != res["blocks"]:
            entry["full_model_est_ms"] = entry["ms"] / res["blocks_run"] * res["blocks"]
    sizes = SimpleNamespace(case=dataclasses.replace(case, blocks=res["blocks_run"]), dim=res["dim"],
                            s_img=res["s_img"], s_txt=res["s_txt"], dtype=torch.bfloat16, tiny=tiny)
    res.update(case_cost(sizes))  # the blocks' cost (embedders, head and optimizer step are small beside it)
    if ceilings:
        _floor(res, ceilings)
    for name, entry in res["providers"].items():
        entry["label"] = PROVIDERS[name].label
        log(f"{prefix}{case.name}: {name:14s} {_line(entry)}")
    _ratios(res)
    return res


def _floor(res, ceilings):
    t_flops = res["flops"] / (ceilings["matmul_tflops"] * 1e9)
    t_bytes = res["bytes"] / (ceilings["copy_tbps"] * 1e9)
    res.update(floor_ms=max(t_flops, t_bytes), floor_bound="compute" if t_flops > t_bytes else "memory")


def _run_provider(w, name, ref, stock_errs, device, quick) -> dict:
    if name != "stock" and stock_errs is None:
        raise Unavailable("stock eager did not run, so there is nothing to verify against")
    impl = PROVIDERS[name].build(w)
    registry.use_backend(impl.backend)
    out = {}
    t0 = time.perf_counter()
    if impl.collect is None:
        impl.step(w.inputs[0])
        out.update(status="ceiling", reason="different function (no bias/norm/RoPE): a bound, not verified")
    else:
        errs = compare(impl.collect(w.inputs[0]), ref)
        out["errors"] = errs
        out["max_err"] = max(errs.values()) if errs else 0.0
        ok, why = judge(errs, errs if name == "stock" else stock_errs)
        if not ok:
            out.update(status="wrong", reason=why)
            return out
        out["status"] = "ok"
    sync(device)
    out["first_call_s"] = time.perf_counter() - t0  # includes compilation / autotuning for compiled providers
    it = iter(range(1 << 62))

    def fn():  # rotate through input sets larger than L2 so every run reads fresh inputs from memory
        impl.step(w.inputs[next(it) % len(w.inputs)])

    med, p20, p80 = bench_fn(fn, device, impl.grads, quick)
    out.update(ms=med, p20=p20, p80=p80)
    if torch.device(device).type == "cuda":
        sync(device)
        for g in impl.grads:
            g.grad = None
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    for g in impl.grads:
        g.grad = None
    return out


def _ratios(res):
    provs = res["providers"]
    for base in registry.BASELINES:
        b = provs.get(base, {})
        if b.get("status") != "ok":
            continue
        for p in provs.values():
            if p.get("ms"):
                p[f"vs_{base.replace('-', '_')}"] = b["ms"] / p["ms"]


def _line(e):
    if "ms" in e:
        s = f"{e['ms']:9.3f} ms [{e['p20']:.3f}-{e['p80']:.3f}]  {e['status']}"
        if "max_err" in e:
            s += f"  err {e['max_err']:.2e}"
        return s + (f"  first call {e['first_call_s']:.1f}s" if e.get("first_call_s", 0) > 1 else "")
    return f"{e['status'].upper()}: {e.get('reason', '')}"


# ----------------------------------------------------------------------------------------------- run
def run(cases: list[Case], providers: list[str], device=None, tiny=None, quick=False, seed=0,
        on_progress=None) -> dict:
    """Measure `cases` x `providers` on `device` (default: CUDA if present). Returns the run record.

    `on_progress(record)` is called once before the first case and after each case, with `complete` False until
    the end: a run killed by a time limit then leaves the cases it finished, and `report.progress` says which
    case was cut (the first of `planned` not in `cases`) and which never started. A model case also calls it after
    each group of providers, with the case so far under `in_progress` (not in `cases`: it is not finished)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    tiny = (not cuda) if tiny is None else tiny
    t_start = time.perf_counter()
    info = device_info(device)
    log(f"qwen-fused bench on {info['device']}" + ("" if cuda else f" -- {report.SMOKE}"))
    # a CPU's bf16 matmul and copy rates bound nothing this package is for: no ceilings, so no floors
    ceilings = measure_ceilings(device, quick) if cuda else None
    if ceilings:
        log(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.1f} TFLOP/s (n={ceilings['matmul_n']}), "
            f"copy {ceilings['copy_tbps']:.3f} TB/s")
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "run_id": uuid.uuid4().hex[:12],  # saving as it goes replaces this run's entry, never another's
              "commit": git_commit(), **info, "versions": versions(), "tiny": tiny, "quick": quick,
              "smoke": not cuda,
              "dtype": "bfloat16", "ceilings": ceilings,
              "kernels_backend_switch": hasattr(importlib.import_module("qwen_fused.kernels"), "set_backend"),
              "argv": _public_argv(sys.argv[1:]), "planned": [c.name for c in cases], "complete": False,
              "cases": []}
    def partial(res):  # a model case's providers timed so far: kept apart from the finished cases
        record["in_progress"] = res
        on_progress(record)

    if on_progress:
        on_progress(record)
    for i, case in enumerate(cases):
        record["cases"].append(run_case(case, providers, device, tiny, quick, ceilings, seed,
                                        prefix=f"[{i + 1}/{len(cases)}] ",
                                        on_partial=partial if on_progress else None))
        record.pop("in_progress", None)
        record["wall_s"] = time.perf_counter() - t_start
        if on_progress and i + 1 < len(cases):
            on_progress(record)
    record["complete"] = True
    if on_progress:
        on_progress(record)
    return record
