"""The dispatcher between the two Triton forwards (kernels/dispatch.py), the forcing values of QWEN_FUSED_BACKEND,
and the tuning command (its refusal without CUDA; its order and decision rule under a fake timer). CPU: the
interpreter stands in for a GPU named `cpu`."""
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


# ------------------------------------------------------------------------------ the tuning's decision (no GPU)
def _fake_timer(true_ms, first_penalty=0.0):
    """`time_one` for tune.time_rounds: each impl's true median, plus `first_penalty` (a fraction) for whichever
    impl is timed first in its round (a warm-up or clock effect that only a fixed order turns into a verdict);
    records the order of the calls."""
    calls = []

    def time_one(impl):
        first = len(calls) % len(true_ms) == 0
        calls.append(impl)
        return true_ms[impl] * (1 + first_penalty * first)
    return time_one, calls


def test_tune_alternates_the_order_of_the_impls():
    from qwen_fused.kernels import tune

    time_one, calls = _fake_timer({"fused": 1.0, "gemm": 1.0})
    rounds = tune.time_rounds(("fused", "gemm"), 4, time_one)
    assert calls == ["fused", "gemm", "gemm", "fused", "fused", "gemm", "gemm", "fused"]
    assert {k: len(v) for k, v in rounds.items()} == {"fused": 4, "gemm": 4}


@pytest.mark.parametrize("gemm_ms,penalty,expected", [
    (1.0, 0.05, "fused"),    # equal, a 5% first-position cost: alternation cancels it (timed fused first in
                             # every round, fused would show 5% slower and lose)
    (0.98, 0.0, "fused"),    # gemm 2% faster: inside the margin, the default stays
    (0.96, 0.05, "gemm"),    # gemm 4% faster, even with the position cost: a clear win
    (1.10, 0.0, "fused"),
])
def test_tune_keeps_fused_unless_gemm_wins_by_the_margin(gemm_ms, penalty, expected):
    from qwen_fused.kernels import tune

    time_one, _ = _fake_timer({"fused": 1.0, "gemm": gemm_ms}, penalty)
    rounds = tune.time_rounds(("fused", "gemm"), 4, time_one)
    assert tune.decide(rounds, margin=0.03) == expected


def test_tune_margin_is_relative_to_the_default():
    from qwen_fused.kernels import tune

    assert tune.decide({"fused": [2.0, 2.0], "gemm": [1.94, 1.94]}, margin=0.03) == "gemm"  # exactly 3%
    assert tune.decide({"fused": [2.0, 2.0], "gemm": [1.95, 1.95]}, margin=0.03) == "fused"
    assert tune.decide({"fused": [2.0, 2.0], "gemm": [1.95, 1.95]}, margin=0.0) == "gemm"
    # one slow round does not decide: the median of the round medians does
    assert tune.decide({"fused": [1.0, 1.0, 1.0, 9.0], "gemm": [0.99, 0.99, 0.99, 0.99]}) == "fused"


def test_tune_entry_keeps_every_median_and_the_dispatcher_reads_it(tables):
    from qwen_fused.kernels import tune

    rounds = {"fused": [1.2, 1.0, 1.1, 1.3], "gemm": [0.9, 0.8, 0.85, 0.95]}
    e = tune.choice("float32", 0, 8192, rounds)
    assert e["impl"] == "gemm" and e["rounds_ms"] == rounds
    assert e["ms"] == {"fused": pytest.approx(1.15), "gemm": pytest.approx(0.875)}
    write(tables, "Some GPU", [e])
    assert dispatch.choose("Some GPU", 8192, 0, F32) == "gemm"


@pytest.mark.parametrize("argv,match", [(["--rounds", "3"], "even"), (["--rounds", "0"], "even"),
                                        (["--margin", "0.6"], "fraction")])
def test_tune_refuses_odd_rounds_and_bad_margins(tables, capsys, argv, match):
    from qwen_fused.kernels import tune

    with pytest.raises(SystemExit):
        tune.main(["--out", str(tables)] + argv)
    assert match in capsys.readouterr().err
    assert not list(tables.iterdir())


def test_tune_writes_as_it_goes_and_a_cut_run_leaves_no_table(tables, monkeypatch):
    """main() with the GPU faked and `measure` timed by a fake: finished keys are kept in <gpu>.partial.json
    while it runs; only a complete run writes <gpu>.json, the table the dispatcher reads."""
    from qwen_fused.kernels import tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    keys = []

    def measure(rows, rank, dtype, width, heads, head_dim, rounds):
        if len(keys) == cut_at:
            raise KeyboardInterrupt  # stands in for the time limit of the GPU script
        keys.append((rank, rows))
        time_one, _ = _fake_timer({"fused": 1.0, "gemm": 0.9 if rows >= 4096 else 1.0})
        return tune.time_rounds(("fused", "gemm"), rounds, time_one)

    monkeypatch.setattr(tune, "measure", measure)
    argv = ["--out", str(tables), "--rows", "1024,4096", "--ranks", "0,64", "--dtypes", "float32"]
    cut_at = 3
    with pytest.raises(KeyboardInterrupt):
        tune.main(argv)
    assert sorted(p.name for p in tables.iterdir()) == ["fake-gpu.partial.json"]
    part = json.loads((tables / "fake-gpu.partial.json").read_text())
    assert part["tuned"]["complete"] is False and len(part["choices"]) == 3
    keys.clear()
    cut_at = None
    assert tune.main(argv) == 0
    assert sorted(p.name for p in tables.iterdir()) == ["fake-gpu.json"]
    table = json.loads((tables / "fake-gpu.json").read_text())
    assert table["tuned"]["complete"] is True
    assert [(e["rank"], e["rows"], e["impl"]) for e in table["choices"]] == \
        [(0, 1024, "fused"), (0, 4096, "gemm"), (64, 1024, "fused"), (64, 4096, "gemm")]
    assert all(len(v) == 4 for e in table["choices"] for v in e["rounds_ms"].values())  # --rounds 4
