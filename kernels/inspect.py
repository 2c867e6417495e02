"""Compile every Triton kernel the package ships for real GPU targets, on any machine, no GPU needed.

    python -m qwen_fused.kernels.inspect --arch sm_90 [--arch sm_80 ...| --arch all] [--json FILE]
    QWEN_FUSED_TILES=128,256,64,8,3 python -m qwen_fused.kernels.inspect --arch sm_90   # judge a tile config

One row per compiled kernel and configuration: registers a thread, spilled bytes (the stack frame), shared memory
against the target's limit, warps, stages, the tensor-core instruction in the PTX (`wgmma` on Hopper, `tcgen05` on
Blackwell, `mma.sync`), and whether it has TMA loads (`cp.async.bulk.tensor`) or `cp.async`. Exits 1 on a compile
error, on spills at a 16-bit configuration (fp32 ones are reported) or on shared memory above the target's limit;
tests/test_compile.py runs it in CI.

How (design.md section 10): a stand-in Triton driver whose target is the chosen GPU makes every launch compile,
with ptxas, instead of run. Each op's own host code runs as usual on small CPU tensors at the real head layout, and
`_triton_launch.launcher` turns its launches into compiles for the target (`_triton_launch.capability` answers
the target to the tile heuristics), so the configurations checked are the ones the launchers choose: a new kernel
or config is checked once its host function is called from `_calls` below.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# the target's name -> (capability, shared memory a block may use in bytes, as CUDA's occupancy tables give it)
ARCHS = {
    "sm_80": (80, 166912),  # A100
    "sm_89": (89, 101376),  # L40S, RTX 4090
    "sm_90": (90, 232448),  # H100, H200
    "sm_100": (100, 232448),  # B200
    "sm_120": (120, 101376),  # RTX 5090
}
# every module of Triton kernels; the kernels a host function launches are named `*_kernel` (tests/test_compile.py
# checks that each of them is compiled here)
KERNEL_MODULES = ("_triton_qkv", "_triton_block", "_triton_swiglu")
HEADS, HEAD_DIM = 24, 128  # Qwen-Image's head layout; 2.1's 32 x 128 compiles to the same kernels (widths are
ROWS = 16  # runtime integers, none of them specialised on), and row counts are never specialised on either


@dataclass
class Row:
    arch: str
    kernel: str
    config: str  # the call that launched it
    warps: int = 0
    stages: int = 0
    regs: int = 0
    spill: int = 0  # bytes of stack frame a thread: ptxas spills registers there
    shared: int = 0
    shared_limit: int = 0
    mma: str = ""  # the tensor-core instruction in the PTX: wgmma (Hopper), tcgen05 (Blackwell), mma.sync; - none
    tma: bool = False
    cp_async: bool = False
    problem: str = ""


def _calls(dtype):
    """(config label, thunk) for every host function that launches a kernel, at each variant it can choose."""
    import torch

    from . import _triton_block as tb
    from . import _triton_qkv as tq
    from . import _triton_swiglu as ts

    C = HEADS * HEAD_DIM
    cpu = dict(dtype=dtype)
    z = torch.zeros  # values do not matter for compiling (and zeros are free to make)

    def stream(bias: bool, rank: int, factors):
        st = dict(x=z(1, ROWS, C, **cpu), weight=z(3 * C, C, **cpu), bias=z(3 * C, **cpu) if bias else None,
                  norm_q=z(HEAD_DIM, **cpu), norm_k=z(HEAD_DIM, **cpu), cos=z(ROWS, HEAD_DIM // 2),
                  sin=z(ROWS, HEAD_DIM // 2))
        if rank:
            st.update(lora_a=z(rank, C, dtype=factors), lora_b=z(3 * C, rank, dtype=factors), lora_scale=0.5)
        return st

    # what the model sends: inference (no LoRA, no saved pre-norm y), LoRA training at both ends of BLOCK_R,
    # fp32 LoRA factors on a 16-bit base (mixed precision), no bias (Qwen-Image 2.1)
    variants = {"infer": (True, 0, dtype, False), "lora-r16": (True, 16, dtype, True),
                "lora-r128": (True, 128, dtype, True), "no-bias-lora": (False, 32, dtype, True)}
    if dtype != torch.float32:
        variants["lora-fp32-factors"] = (True, 32, torch.float32, True)
    calls = []
    for impl in ("fused", "gemm"):
        for name, (bias, rank, factors, save_y) in variants.items():
            streams = [stream(bias, rank, factors), stream(bias, rank, factors)]
            calls.append((f"qkv {impl} {name}", lambda s=streams, i=impl, y=save_y:
                          tq.forward(s, HEADS, 1e-6, save_y=y, poison=False, impl=i)))
    g = lambda: z(1, 2 * ROWS, HEADS, HEAD_DIM, **cpu)  # noqa: E731
    for need in (True, False):
        streams = [stream(True, 0, dtype), stream(True, 0, dtype)]
        calls.append((f"qkv backward dnorm={need}", lambda s=streams, n=need: tq.epilogue_backward(
            g(), g(), g(), z(1, 2 * ROWS, 2 * C, **cpu), s, HEADS, 1e-6, need_dnorm=n)))
    x, h, w_up, w_down, mod = z(1, ROWS, C, **cpu), z(1, ROWS, 4 * C, **cpu), z(4 * C, C, **cpu), z(C, 4 * C, **cpu), \
        z(1, C, **cpu)
    calls += [
        ("linear_gelu", lambda: tb.linear_gelu(x, w_up, z(4 * C, **cpu), save_pre=True, poison=False)),
        ("linear_gate_residual", lambda: tb.linear_gate_residual(h, w_down, None, mod, x, None, None, 1.0, False)),
        ("modulated_layernorm", lambda: tb.modulated_layernorm(x, mod, mod, 1e-6, False)),
        # Qwen-Image 2.1's merged SwiGLU: 4096 -> 2 x 12288
        ("swiglu gate", lambda: ts.gate_forward(z(ROWS, 2 * 12288, **cpu))),
        ("swiglu gate backward", lambda: ts.gate_backward(z(ROWS, 12288, **cpu), z(ROWS, 2 * 12288, **cpu))),
    ]
    return calls


class _TargetDriver:
    """The part of a Triton driver that compiling asks for, with `capability` as the current GPU."""

    def __init__(self, cap: int):
        self.cap = cap

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cap, 32)

    def get_current_device(self):
        return self.cap  # Triton keeps compiled kernels per device: one "device" per target

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_interface(self):
        import torch

        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("qwen_fused.kernels.inspect compiles only")


@contextmanager
def _target(cap: int, record: list):
    from triton.runtime import driver

    from . import _triton_launch

    before = driver._active
    driver.set_active(_TargetDriver(cap))
    _triton_launch._compiling = (cap, record)
    try:
        yield
    finally:
        _triton_launch._compiling = None
        driver._active = before


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of a cubin, from cuobjdump -res-usage (shipped in Triton's wheel)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(regs), int(stack)


def inspect_arch(arch: str, calls=None) -> list[Row]:
    """Compile every kernel at every configuration for one target (or those `calls` launch: a function of the
    dtype giving (label, thunk) pairs, as `_calls`); one Row per distinct compiled kernel."""
    import torch

    cap, limit = ARCHS[arch]
    rows, seen = [], set()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for label, call in (calls or _calls)(dtype):
            record: list = []
            config = f"{str(dtype).removeprefix('torch.')} {label}"
            try:
                with _target(cap, record):
                    call()
            except Exception as e:  # a compile error: report it, go on with the rest
                msg = " ".join(str(e).split())
                rows.append(Row(arch, record[-1][0].__name__ if record else "?", config,
                                problem=f"does not compile: {type(e).__name__}: {msg[:300]}"))
                continue
            for kernel, compiled in record:
                if compiled.hash in seen:
                    continue
                seen.add(compiled.hash)
                rows.append(_row(arch, kernel.__name__, config, compiled, limit, dtype != torch.float32))
    return rows


def _row(arch, name, config, compiled, limit, half) -> Row:
    meta = compiled.metadata
    regs, stack = _resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    mma = next((m for m in ("wgmma", "tcgen05.mma", "mma.sync") if m in ptx), "-").removesuffix(".mma")
    row = Row(arch, name, config, meta.num_warps, meta.num_stages, regs, stack, meta.shared, limit, mma,
              "cp.async.bulk.tensor" in ptx, "cp.async" in ptx)
    problems = []
    if stack and half:
        problems.append(f"spills {stack} bytes a thread")
    if meta.shared > limit:
        problems.append(f"needs {meta.shared} bytes of shared memory, the target has {limit}")
    row.problem = "; ".join(problems)
    return row


def _table(rows: list[Row]) -> str:
    head = ("arch", "kernel", "config", "warps", "stages", "regs", "spill", "shared KB", "mma", "tma", "cp.async",
            "problem")
    body = [(r.arch, r.kernel, r.config, r.warps, r.stages, r.regs, r.spill,
             f"{r.shared / 1024:.0f}/{r.shared_limit / 1024:.0f}", r.mma or "-", *("yes" if f else "-" for f in
                                                                                 (r.tma, r.cp_async)), r.problem)
            for r in rows]
    cells = [tuple(map(str, line)) for line in (head, *body)]
    width = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, width)).rstrip() for line in cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_fused.kernels.inspect", description=__doc__.split("\n")[0])
    p.add_argument("--arch", action="append", choices=[*ARCHS, "all"],
                   help="target GPU (repeatable; default sm_90; all: %s)" % ", ".join(ARCHS))
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="targets compiled at once (processes)")
    args = p.parse_args(argv)
    archs = list(ARCHS) if "all" in (args.arch or []) else list(dict.fromkeys(args.arch or ["sm_90"]))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the interpreter compiles nothing, and is chosen when triton is first imported: rerun without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "qwen_fused.kernels.inspect",
                                *(sys.argv[1:] if argv is None else argv)], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    jobs = max(1, min(args.jobs, len(archs)))
    if jobs == 1:
        per_arch = [inspect_arch(arch) for arch in archs]
    else:  # compiling is CPU-bound and mostly holds the GIL: one process per target
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            per_arch = list(pool.map(inspect_arch, archs))
    rows = [r for arch_rows in per_arch for r in arch_rows]
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    bad = [r for r in rows if r.problem]
    print(f"\n{len(rows)} kernels compiled for {', '.join(archs)} with Triton {_triton_version()}: "
          + (f"{len(bad)} with problems" if bad else "no compile errors, no 16-bit spills, shared memory within"))
    return 1 if bad else 0


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
