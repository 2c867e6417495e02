"""The dispatcher between the two Triton forwards (kernels/dispatch.py), the forcing values of QWEN_FUSED_BACKEND,
and the tuning command's refusal without CUDA. CPU: the interpreter stands in for a GPU named `cpu`."""
import json
from pathlib import Path

import pytest
import torch
from test_kernels import _fq, _tq, make_stream  # noqa: F401 (_tq: skips without triton)

from qwen_fused.kernels import BackendError, dispatch, fused_qkv, set_backend
from qwen_fused.kernels.backend import BACKENDS

pytestmark = pytest.mark.kernel
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32 = torch.float32


def entry(rows, rank, impl, dtype="float32"):
    return dict(dtype=dtype, rank=rank, rows=rows, impl=impl, ms={"fused": 1.0, "gemm": 1.0})


@pytest.fixture(autouse=True)
def tables(tmp_path, monkeypatch):
    """An empty tuning folder of our own; tests write tables into it."""
    monkeypatch.setenv(dispatch.ENV_DIR, str(tmp_path))
    monkeypatch.delenv("QWEN_FUSED_BACKEND", raising=False)
    dispatch.clear_cache()
    set_backend(None)
    yield tmp_path
    set_backend(None)
    dispatch.clear_cache()


def write(folder, gpu, choices):
    (Path(folder) / f"{dispatch.slug(gpu)}.json").write_text(json.dumps(dict(gpu=gpu, choices=choices)))


def test_slug_matches_bench_results_naming():
    assert dispatch.slug("NVIDIA H200") == "nvidia-h200"
    assert dispatch.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_table_entry_is_honoured_nearest_key(tables):
    write(tables, "NVIDIA H200", [entry(1024, 0, "fused", "bfloat16"), entry(8192, 0, "gemm", "bfloat16"),
                                  entry(8192, 64, "fused", "bfloat16"), entry(8192, 0, "fused", "float16")])
    bf = torch.bfloat16
    assert dispatch.choose("NVIDIA H200", 8192, 0, bf) == "gemm"
    assert dispatch.choose("NVIDIA H200", 9216, 0, bf) == "gemm"     # nearest rows
    assert dispatch.choose("NVIDIA H200", 1500, 0, bf) == "fused"
    assert dispatch.choose("NVIDIA H200", 8192, 64, bf) == "fused"   # LoRA or not decides before rows
    assert dispatch.choose("NVIDIA H200", 1024, 16, bf) == "fused"
    assert dispatch.choose("NVIDIA H200", 8192, 0, torch.float16) == "fused"  # per dtype
    assert dispatch.choose("NVIDIA H200", 8192, 0, F32) == dispatch.DEFAULT  # no entry for the dtype


def test_unknown_gpu_gets_the_default(tables):
    write(tables, "NVIDIA H200", [entry(8192, 0, "gemm")])
    assert dispatch.DEFAULT == "fused"  # today's kernel until a measurement says otherwise
    assert dispatch.choose("Some Future GPU", 8192, 0, F32) == "fused"


@pytest.mark.parametrize("impl", ["fused", "gemm"])
def test_a_call_takes_the_tabled_route(tables, monkeypatch, impl):
    """End to end: the table for this device (the interpreter's `cpu`) picks what `fused_qkv` runs."""
    write(tables, dispatch.device_name(DEV), [entry(1, 0, "fused"), entry(1000, 0, impl)])
    ran = []
    monkeypatch.setattr(_tq, "forward", lambda *a, _f=_tq.forward: ran.append(a[-1]) or _f(*a))
    st = make_stream(1, 5, 32, 2, 16, None)
    set_backend("triton")
    fused_qkv(st["x"], st["weight"], heads=2)                           # 5 rows: nearest entry says fused
    fused_qkv(st["x"].expand(40, -1, -1), st["weight"], heads=2)        # 200 rows: nearest says `impl`
    assert ran == ["fused", impl]


@pytest.mark.parametrize("backend,expected", [("triton-fused", "fused"), ("triton-gemm", "gemm"), ("torch", "torch"),
                                              ("triton", "gemm")])
@pytest.mark.parametrize("how", ["set_backend", "env"])
def test_forcing_values(tables, monkeypatch, backend, expected, how):
    """triton-fused / triton-gemm override the table (which says gemm here); torch still means the torch path."""
    write(tables, dispatch.device_name(DEV), [entry(8, 0, "gemm"), entry(8, 4, "gemm")])
    if how == "env":
        monkeypatch.setenv("QWEN_FUSED_BACKEND", backend)
    else:
        set_backend(backend)
    assert _fq.route(DEV, F32, 16, rows=8, rank=4) == expected
    st = make_stream(1, 8, 32, 2, 16, 4)
    q = fused_qkv(st["x"], st["weight"], heads=2, lora_a=st["lora_a"], lora_b=st["lora_b"])[0]
    assert q.shape == (1, 8, 2, 16) and torch.isfinite(q).all()


def test_forcing_values_refuse_what_the_kernels_cannot_compute():
    x = torch.randn(1, 3, 16, device=DEV)
    w = torch.randn(3 * 2 * 24, 16, device=DEV)
    for backend in ("triton-fused", "triton-gemm"):
        set_backend(backend)
        with pytest.raises(BackendError, match=f"QWEN_FUSED_BACKEND={backend} cannot run this call: head_dim 24"):
            fused_qkv(x, w, heads=2)
    assert set(BACKENDS) == {"auto", "triton", "torch", "triton-fused", "triton-gemm"}


@pytest.mark.parametrize("content,match", [
    ("{not json", "not readable JSON"),
    ('[1, 2]', 'expected an object with a "choices" list'),
    ('{"choices": [1]}', "choice 0 is not an object"),
    (json.dumps({"choices": [entry(8, 0, "gemm", "bf16")]}), "choice 0: dtype 'bf16' is not one of"),
    (json.dumps({"choices": [entry(8, 0, "gemm"), entry(0, 0, "gemm")]}), "choice 1: rows must be an integer >= 1"),
    (json.dumps({"choices": [entry(8, -1, "gemm")]}), "rank must be an integer >= 0"),
    (json.dumps({"choices": [entry(8, 0, "cublas")]}), "impl 'cublas' is not one of fused, gemm"),
])
def test_malformed_table_is_a_clear_error(tables, content, match):
    path = tables / "nvidia-h200.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        dispatch.choose("NVIDIA H200", 8, 0, F32)
    assert str(path) in str(e.value) and "qwen_fused.kernels.tune" in str(e.value)


def test_committed_tables_parse():
    """Every table shipped in kernels/tuning/ is one the dispatcher accepts, under its GPU's file name."""
    folder = Path(dispatch.__file__).parent / "tuning"
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        dispatch.parse_table(data, path)
        assert path.name == f"{dispatch.slug(data['gpu'])}.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_tune_refuses_without_cuda(tables):
    from qwen_fused.kernels import tune

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tune.main(["--out", str(tables)])
    assert not list(tables.iterdir())  # nothing written


def test_route_under_compile_is_a_constant_of_the_graph(tables):
    """torch.compile(fullgraph=True) traces the route: no graph break on the table read; rows count as unknown
    there (they may be symbolic), so the entry of the largest rows decides, for every length."""
    write(tables, dispatch.device_name(DEV), [entry(8, 0, "fused"), entry(4096, 0, "gemm")])
    set_backend("triton")

    def f(x):
        impl = _fq.route(x.device, x.dtype, 16, x.shape[0] * x.shape[1], 0)
        return x + (1 if impl == "gemm" else 2)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for n in (8, 9, 10):  # the second length recompiles with dynamic shapes
        assert (compiled(torch.zeros(1, n)) == 1).all()
    assert (f(torch.zeros(1, 8)) == 2).all()  # eager: the nearest entry, fused
