"""Every shipped Triton kernel compiles for real GPU targets, without a GPU (kernels/inspect.py, design.md 10).

The interpreter that runs the other kernel tests on CPU compiles nothing, so these are the only CPU tests that see
what a GPU's compiler does: compile errors, register spills, shared memory. They run in subprocesses without
TRITON_INTERPRET (conftest sets it for this process before triton is imported).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from qwen_fused.kernels.inspect import ARCHS, KERNEL_MODULES

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _python(code: str, timeout: int = 600, folder=None):
    """Run `code` in a fresh interpreter without TRITON_INTERPRET (from a file in `folder`: @triton.jit needs one)."""
    if folder is None:
        cmd = [sys.executable, "-c", textwrap.dedent(code)]
    else:
        (folder / "probe.py").write_text(textwrap.dedent(code))
        cmd = [sys.executable, str(folder / "probe.py")]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _kernels_shipped() -> set[str]:
    """The launched kernels of every Triton module of the package (by convention named `*_kernel`)."""
    out = _python(f"""
        import importlib, triton
        mods = [importlib.import_module("qwen_fused.kernels." + m) for m in {KERNEL_MODULES!r}]
        print(*sorted(n for m in mods for n, f in vars(m).items()
                      if isinstance(f, triton.runtime.JITFunction) and n.endswith("_kernel")))
    """, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "rows.json"
    run = subprocess.run([sys.executable, "-m", "qwen_fused.kernels.inspect", "--arch", "all", "--json", str(path)],
                         env=ENV, capture_output=True, text=True, timeout=1800)
    return run, json.loads(path.read_text()) if path.exists() else []


def test_every_triton_module_is_inspected():
    from pathlib import Path

    import qwen_fused.kernels

    found = {p.stem for p in Path(qwen_fused.kernels.__file__).parent.glob("_triton_*.py")} - {"_triton_launch"}
    assert found == set(KERNEL_MODULES)


def test_every_kernel_compiles_for_every_target_without_spills(inspected):
    run, rows = inspected
    bad = [f"{r['arch']} {r['kernel']} ({r['config']}): {r['problem']}" for r in rows if r["problem"]]
    assert not bad, "\n".join(bad)
    assert run.returncode == 0 and rows, run.stdout[-4000:] + run.stderr[-4000:]
    assert {r["arch"] for r in rows} == set(ARCHS)
    # the configurations come from the launchers' own host code: every shipped kernel must have been launched
    for arch in ARCHS:
        assert {r["kernel"] for r in rows if r["arch"] == arch} == _kernels_shipped(), arch
    assert "kernels compiled" in run.stdout and "shared KB" in run.stdout  # the table people read


def test_hopper_main_loop_uses_tensor_cores_and_async_copies(inspected):
    _, rows = inspected
    fused = [r for r in rows if r["arch"] == "sm_90" and r["kernel"] == "_qkv_fwd_kernel"
             and not r["config"].startswith("float32")]
    assert fused and all(r["mma"] == "wgmma" and r["cp_async"] for r in fused), fused


def test_interpreter_setting_is_no_obstacle():
    # conftest set TRITON_INTERPRET=1 here; the command reruns itself without it rather than compile nothing
    assert os.environ.get("TRITON_INTERPRET") == "1"
    run = subprocess.run([sys.executable, "-m", "qwen_fused.kernels.inspect", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "--arch" in run.stdout


def _inspect_one(tmp_path, kernel_src: str, launch: str):
    """inspect_arch on a kernel written here, launched through the package's launcher: its rows as dicts."""
    return _python(folder=tmp_path, code=f"""
        import json, dataclasses, torch, triton, triton.language as tl
        from qwen_fused.kernels import inspect
        from qwen_fused.kernels._triton_launch import launcher
        {textwrap.indent(textwrap.dedent(kernel_src), ' ' * 8).strip()}
        def calls(dtype):
            x = torch.zeros(4096, dtype=dtype)
            return [("probe", lambda: {launch})] if dtype == torch.float16 else []
        print(json.dumps([dataclasses.asdict(r) for r in inspect.inspect_arch("sm_90", calls)]))
    """)


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    # the GELU kernel's bug: a plain Python float global, which only the interpreter accepts
    run = _inspect_one(tmp_path, """
        SCALE = 0.5
        @triton.jit
        def _probe_kernel(X, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(X + offs, tl.load(X + offs) * SCALE)
    """, "launcher(_probe_kernel, x)[(1,)](x, BLOCK=1024)")
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(run.stdout.splitlines()[-1])
    assert row["kernel"] == "_probe_kernel" and row["problem"].startswith("does not compile"), row
    assert "SCALE" in row["problem"]


def test_register_spills_are_reported(tmp_path):
    # a 128 x 128 fp32 tile in one warp: 512 values a thread, more than the 255 registers it may have
    run = _inspect_one(tmp_path, """
        @triton.jit
        def _probe_kernel(X, BLOCK: tl.constexpr):
            r = tl.arange(0, BLOCK)
            a = tl.load(X + r[:, None] * BLOCK + r[None, :]).to(tl.float32)
            b = tl.sum(tl.exp(a) * a, axis=0)
            tl.store(X + r[:, None] * BLOCK + r[None, :], (a / b[None, :]).to(X.dtype.element_ty))
    """, "launcher(_probe_kernel, x)[(1,)](x, BLOCK=128, num_warps=1)")
    assert run.returncode == 0, run.stderr
    (row,) = json.loads(run.stdout.splitlines()[-1])
    assert row["spill"] > 0 and row["problem"].startswith("spills"), row


def test_shared_memory_above_the_target_is_reported(monkeypatch):
    from types import SimpleNamespace

    from qwen_fused.kernels import inspect

    class Compiled:
        metadata = SimpleNamespace(num_warps=8, num_stages=4, shared=ARCHS["sm_89"][1] + 1)
        asm = {"cubin": b"", "ptx": "wgmma.mma_async cp.async"}

    monkeypatch.setattr(inspect, "_resources", lambda cubin: (128, 0))  # no cubin to read in this fake
    row = inspect._row("sm_89", "k", "cfg", Compiled(), ARCHS["sm_89"][1], half=True)
    assert "shared memory" in row.problem and row.mma == "wgmma"
