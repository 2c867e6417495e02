"""Benchmark runner on CPU: registry, verification before timing, per-GPU results files, reports."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest
import torch

from qwen_fused.bench import model_level, registry, report, runner
from qwen_fused.bench.registry import PROVIDERS, Case, Provider
from qwen_fused.cli import main as cli_main

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cpu_run():
    cases = [Case.parse("op/train-512/b1/fwdbwd-r32"), Case.parse("block/train-512/b1/fwdbwd-r32")]
    return runner.run(cases, ["stock", "ours-torch", "ours-blocks", "gemm"], CPU, tiny=True, quick=True)


def test_case_names_round_trip_and_bad_names_are_named():
    cases = registry.all_cases(blocks=3)
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:
        assert Case.parse(c.name) == c
    assert [c.name for c in registry.select_cases(quick=True)] == registry.QUICK_CASES + registry.QUICK_MODEL_CASES
    assert {c.level for c in registry.select_cases(["*/edit-1024/b1/fwd*"], level=["block"])} == {"block"}
    with pytest.raises(ValueError, match="SHAPE"):
        Case.parse("op/edit-2048/b1/fwd")
    with pytest.raises(ValueError, match="LoRA rank"):
        Case.parse("block/edit-1024/b1/fwdbwd")
    with pytest.raises(ValueError, match="matches no case"):
        registry.select_cases(["nothing/*"])
    with pytest.raises(ValueError, match="unknown provider"):
        registry.select_providers(["stock", "fastest"])


def test_canonical_grads_merge_stock_qkv_lora():
    g = {f"b.attn.{n}.lora_{ab}.default.weight": torch.full((2, 3), float(i + 1))
         for i, n in enumerate(("to_q", "to_k", "to_v")) for ab in "AB"}
    g["b.attn.to_out.0.lora_A.default.weight"] = torch.ones(1)
    out = registry.canonical_grads(g)
    assert set(out) == {"b.attn.to_qkv.lora_A.default.weight", "b.attn.to_qkv.lora_B.default.weight",
                        "b.attn.to_out.0.lora_A.default.weight"}
    assert torch.equal(out["b.attn.to_qkv.lora_A.default.weight"], torch.full((2, 3), 6.0))  # A shared: summed
    assert out["b.attn.to_qkv.lora_B.default.weight"].shape == (6, 3)  # B: stacked rows q, k, v
    del g["b.attn.to_v.lora_B.default.weight"]
    with pytest.raises(ValueError, match="incomplete"):
        registry.canonical_grads(g)


def test_cpu_run_verifies_then_times(cpu_run):
    assert cpu_run["gpu"] is None and cpu_run["tiny"]
    json.dumps(cpu_run)  # JSON-ready
    for case in cpu_run["cases"]:
        stock, ours = case["providers"]["stock"], case["providers"]["ours-torch"]
        assert stock["status"] == "ok" and stock["vs_stock"] == 1.0
        assert 0 < stock["max_err"] < 0.05  # bf16 against the float64 reference
        assert ours["status"] == "ok", ours.get("reason")
        assert set(ours["errors"]) == set(stock["errors"])
        blocks = case["providers"]["ours-blocks"]  # fuse_blocks: block level only
        assert blocks["status"] == ("unavailable" if case["level"] == "op" else "ok"), blocks.get("reason")
        assert any(k.startswith("grad.") and "to_qkv.lora_B" in k for k in ours["errors"])  # LoRA grads checked
        assert ours["ms"] > 0 and ours["p20"] <= ours["ms"] <= ours["p80"]
        assert ours["vs_stock"] == pytest.approx(stock["ms"] / ours["ms"])
    assert cpu_run["cases"][0]["flops"] > 0
    # a CPU run is a smoke run: no measured ceilings, so no floors and no bare-GEMM "ceiling" to compare with
    assert cpu_run["smoke"] and cpu_run["ceilings"] is None
    for case in cpu_run["cases"]:
        assert "floor_ms" not in case and case["providers"]["gemm"]["status"] == "unavailable"
    assert "gemm" not in registry.select_providers(cuda=False)


def test_cpu_run_is_labelled_a_smoke_run(cpu_run):
    for text in (report.markdown(cpu_run), report.terminal_table(cpu_run)):
        assert "smoke run" in text and "not a measurement" in text
        assert "floor" not in text and "TFLOP" not in text


def _broken_ours(w):
    impl = registry.build_ours(w, "torch")
    step = impl.step

    def wrong(inp):  # k off by 5%: a provider that is fast and wrong
        q, k, v = step(inp)
        return q, k * 1.05, v
    return registry.Impl(step=wrong, collect=w._collect(wrong, registry.Params()), backend="torch")


def test_wrong_provider_is_reported_not_timed(monkeypatch, tmp_path):
    monkeypatch.setitem(PROVIDERS, "broken", Provider("broken", "deliberately wrong", _broken_ours))
    rec = runner.run([Case.parse("op/train-512/b1/fwd")], ["stock", "broken", "ours-torch"], CPU, tiny=True,
                     quick=True)
    provs = rec["cases"][0]["providers"]
    assert provs["broken"]["status"] == "wrong"
    assert "out1" in provs["broken"]["reason"]
    assert "ms" not in provs["broken"] and "vs_stock" not in provs["broken"]
    assert provs["ours-torch"]["status"] == "ok"
    assert "wrong" in report.markdown(rec)
    # the CLI exits non-zero when a provider fails verification
    rc = cli_main(["bench", "--cases", "op/train-512/b1/fwd", "--providers", "broken", "--out",
                   str(tmp_path), "--device", "cpu"])
    assert rc == 3


def test_cli_writes_json_markdown_chart(tmp_path, capsys):
    rc = cli_main(["bench", "--cases", "op/train-512/b1/fwd", "--providers", "ours-torch", "--out", str(tmp_path),
                   "--device", "cpu", "--results-dir", str(tmp_path / "results")])
    assert rc == 0
    js, = tmp_path.glob("bench-*.json")
    rec = json.loads(js.read_text())
    assert [c["case"] for c in rec["cases"]] == ["op/train-512/b1/fwd"]
    assert list(rec["cases"][0]["providers"]) == ["stock", "ours-torch"]
    assert js.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| op/train-512/b1/fwd | ours-torch | ok |" in js.with_suffix(".md").read_text()
    assert not (tmp_path / "results").exists()  # CPU runs never go into the per-GPU results
    out = capsys.readouterr()
    assert "GPU numbers need a GPU" in out.err
    assert "smoke run" in out.err and "TFLOP/s" not in out.err


def _gpu_record(cpu_run, gpu, stock_ms, ours_ms):
    rec = copy.deepcopy(cpu_run)
    rec.update(gpu=gpu, device=gpu, tiny=False, smoke=False, run_id=uuid.uuid4().hex[:12])  # another run
    for case in rec["cases"]:
        case["providers"]["stock"]["ms"], case["providers"]["ours-torch"]["ms"] = stock_ms, ours_ms
        for p in case["providers"].values():
            p.pop("vs_stock", None)
        runner._ratios(case)
    return rec


def test_results_files_keep_runs_and_gpus_apart(cpu_run, tmp_path):
    h100 = _gpu_record(cpu_run, "NVIDIA H100 80GB HBM3", 2.0, 1.0)
    h100b = _gpu_record(cpu_run, "NVIDIA H100 80GB HBM3", 3.0, 1.0)
    h200 = _gpu_record(cpu_run, "NVIDIA H200", 4.0, 1.0)
    p1 = report.append_run(h100, tmp_path)
    assert report.append_run(h100b, tmp_path) == p1 and p1.name == "nvidia-h100-80gb-hbm3.json"
    p2 = report.append_run(h200, tmp_path)
    assert p2 != p1
    data = report.read_results(p1)
    assert data["gpu"] == "NVIDIA H100 80GB HBM3" and len(data["runs"]) == 2
    assert [r["cases"][0]["providers"]["ours-torch"]["vs_stock"] for r in data["runs"]] == [2.0, 3.0]
    assert len(report.read_results(p2)["runs"]) == 1

    # a file named for one GPU but holding another's runs is refused, and left as it was
    wrong = tmp_path / "nvidia-h200.json"
    wrong.write_text(p1.read_text())
    before = wrong.read_text()
    with pytest.raises(ValueError, match="never mixed"):
        report.append_run(h200, tmp_path)
    assert wrong.read_text() == before
    with pytest.raises(ValueError, match="CPU run"):
        report.append_run(cpu_run, tmp_path)
    (tmp_path / "nvidia-h100-80gb-hbm3.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.append_run(h100, tmp_path)


def test_summary_tables_come_from_each_gpus_latest_run(cpu_run, tmp_path):
    report.append_run(_gpu_record(cpu_run, "NVIDIA H100 80GB HBM3", 2.0, 1.0), tmp_path)
    report.append_run(_gpu_record(cpu_run, "NVIDIA H100 80GB HBM3", 5.0, 1.0), tmp_path)
    report.append_run(_gpu_record(cpu_run, "NVIDIA H200", 7.0, 1.0), tmp_path)
    md = report.summary(tmp_path)
    assert "### NVIDIA H100 80GB HBM3" in md and "### NVIDIA H200" in md
    assert "5.00x" in md and "7.00x" in md and "2.00x" not in md
    assert "2.00x" in report.summary(tmp_path, all_runs=True)
    assert "No results" in report.summary(tmp_path / "empty")
    assert cli_main(["bench", "--summary", "--results-dir", str(tmp_path)]) == 0
    assert report.main([str(tmp_path)]) == 0


def test_results_file_holds_a_run_as_it_goes(cpu_run, tmp_path):
    """The bench saves a GPU run into its results file before the first case and after each: one entry per run
    (replaced, not appended again), marked partial until the run completes, and labelled so in every table."""
    full = _gpu_record(cpu_run, "NVIDIA H200", 4.0, 1.0)
    planned = [c["case"] for c in full["cases"]]
    assert len(planned) == 2
    for n in range(len(planned) + 1):  # what runner.run hands on_progress: 0 cases, 1 case, then complete
        rec = dict(full, cases=full["cases"][:n], planned=planned, complete=n == len(planned))
        path = report.append_run(rec, tmp_path)
        runs = report.read_results(path)["runs"]
        assert len(runs) == 1 and len(runs[0]["cases"]) == n and runs[0]["complete"] == (n == 2)
        if n == 1:  # as a run killed in its second case leaves the file
            note = report.progress(runs[0])
            assert note.startswith("PARTIAL RUN") and f"cut in: {planned[1]}" in note and "not started: -" in note
            assert "PARTIAL RUN" in report.markdown(runs[0]) and "PARTIAL RUN" in report.terminal_table(runs[0])
            assert "PARTIAL RUN" in report.summary(tmp_path)
    assert report.progress(runs[0]) == "" and "PARTIAL" not in report.markdown(runs[0])
    other = _gpu_record(cpu_run, "NVIDIA H200", 5.0, 1.0)  # another run (its own run_id) is appended
    assert len(report.read_results(report.append_run(other, tmp_path))["runs"]) == 2
    # --since: the runs of one session (gpu_run.sh prints those it added)
    assert "5.00x" in report.summary(tmp_path, since=full["date"])
    assert report.summary(tmp_path, since="9999-01-01").startswith("No runs dated 9999-01-01")


_KILL_AT_SECOND_CASE = """
import os, signal, sys
from qwen_fused.bench import runner
from qwen_fused.cli import main
real = runner.run_case
def run_case(case, *a, **k):
    if case.name == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)  # what `timeout -s KILL` does: no Python cleanup runs
    return real(case, *a, **k)
runner.run_case = run_case
main(["bench", "--cases", sys.argv[1], "--providers", "ours-torch", "--device", "cpu", "--out", sys.argv[3]])
"""


def test_a_killed_run_keeps_its_finished_cases_and_writes_no_final_files(tmp_path):
    """Reduced size on CPU: a run killed in its second of three cases leaves the first in its partial file,
    names the cut case, and leaves no file that looks like a finished run."""
    cases = ["op/train-512/b1/fwd", "op/t2i-1328/b1/fwd", "op/edit-1024/b1/fwd"]
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_SECOND_CASE, ",".join(cases), cases[1], str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    files = sorted(f.name for f in tmp_path.iterdir())
    partial, = [f for f in files if f.endswith("-partial.json")]
    assert files == [partial], files  # no bench-*.json / .md / .png of a "finished" run
    rec = json.loads((tmp_path / partial).read_text())
    assert rec["complete"] is False and rec["planned"] == cases
    assert [c["case"] for c in rec["cases"]] == cases[:1]
    assert rec["cases"][0]["providers"]["ours-torch"]["status"] == "ok"
    note = report.progress(rec)
    assert f"1 of 3 cases finished; cut in: {cases[1]}; not started: {cases[2]}" in note


def test_recorded_command_line_hides_the_folders_written_to():
    argv = ["bench", "--quick", "--out", "/somewhere/out", "--results-dir=/else/results", "--cases", "op/*"]
    assert runner._public_argv(argv) == ["bench", "--quick", "--out", "<path>", "--results-dir=<path>",
                                         "--cases", "op/*"]


def test_unusable_device_is_an_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, on any machine
    assert cli_main(["bench", "--cases", "op/train-512/b1/fwd", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "qwen-fused bench: error: --device cuda: no cuda device available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- model level
MODEL_CASES = ["model/edit-1024/b1/fwd/n60", "model/train-512/b1/fwdbwd-r32-gc/n60"]


def test_model_case_names_parse_and_are_quick():
    fwd, train = (Case.parse(n) for n in MODEL_CASES)
    assert (fwd.level, fwd.shape, fwd.mode, fwd.blocks) == ("model", "edit-1024", "fwd", 60)
    assert (train.level, train.shape, train.mode, train.rank, train.gc, train.blocks) == \
        ("model", "train-512", "fwdbwd", 32, True, 60)
    assert [fwd.name, train.name] == MODEL_CASES
    assert registry.QUICK_MODEL_CASES == MODEL_CASES
    assert [c.name for c in registry.select_cases(quick=True, level=["model"])] == MODEL_CASES


def test_interleaving_alternates_direction():
    order = model_level.interleaved(["stock", "stock-compile"], 3)
    assert order == ["stock", "stock-compile", "stock-compile", "stock", "stock", "stock-compile"]
    order = model_level.interleaved(["a", "b", "c"], 4)
    assert order[:6] == ["a", "b", "c", "c", "b", "a"]
    assert all(order.count(n) == 4 for n in "abc")


def test_ours_gets_the_stock_lora_through_load_lora():
    import qwen_fused

    # fp32, so that the same LoRA has to give the same output to rounding
    s = model_level.Setup(Case.parse(MODEL_CASES[1]), CPU, tiny=True, blocks=2, dtype=torch.float32)
    model = s.model(2)
    rank = s.case.rank
    steps = model_level.groups(s, model, ["stock", "ours-torch"])
    names, run = next(steps)
    assert names == ["stock"]
    stock_lora = {k: v.clone() for k, v in model_level.lora_tensors(model).items()}
    a = [stock_lora[f"transformer_blocks.0.attn.{p}.lora_A.default.weight"] for p in ("to_q", "to_k", "to_v")]
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # a stock LoRA: its own A per projection
    run.use("stock")
    stock = run.collect(rank)
    names, run = next(steps)
    assert names == ["ours-torch"] and qwen_fused.is_fused(model)
    assert any(".to_qkv.lora_A." in n for n in model_level.lora_tensors(model))
    ours_lora = model_level.stock_view(model_level.lora_tensors(model), rank)
    assert ours_lora.keys() == stock_lora.keys()
    for k in stock_lora:
        assert torch.equal(ours_lora[k].to(stock_lora[k].dtype), stock_lora[k]), k
    run.use("ours-torch")
    ours = run.collect(rank)
    registry.use_backend_reset()
    assert ours.keys() == stock.keys() and any(k.endswith("to_v.lora_B.default.weight") for k in ours)
    for k in stock:
        assert runner.rel_err(ours[k], stock[k]) < 1e-4, k


def test_model_cases_run_and_verify_on_cpu():
    done = []  # the CLI saves the record before the first case, after each group of providers and after each case

    def progress(r):
        part = r.get("in_progress")
        timed = sorted(n for n, p in part["providers"].items() if "ms" in p) if part else None
        done.append((len(r["cases"]), r["complete"], timed))
        if part and timed == ["stock"]:  # a run cut now names the case and what it had timed
            assert f"cut in: {part['case']} (timed before the cut, under in_progress: stock)" in report.progress(r)

    rec = runner.run([Case.parse(n) for n in MODEL_CASES], ["stock", "ours-triton", "ours-torch", "ours-blocks"],
                     CPU, tiny=True, quick=True, on_progress=progress)
    groups = [(0, False, ["stock"]), (0, False, ["ours-torch", "stock"]),
              (0, False, ["ours-blocks", "ours-torch", "stock"])]  # stock, then ours, then ours-blocks
    assert done == [(0, False, None)] + groups + [(1, False, None)] + [(1,) + g[1:] for g in groups] + \
        [(2, True, None)]
    assert "in_progress" not in rec
    json.dumps(rec)
    for case in rec["cases"]:
        assert case["blocks"] == 60 and case["blocks_run"] == model_level.TINY_MAX_BLOCKS
        provs = case["providers"]
        assert provs["ours-triton"]["status"] == "unavailable"
        for name in ("stock", "ours-torch", "ours-blocks"):
            p = provs[name]
            assert p["status"] == "ok", p.get("reason")
            assert len(p["samples_ms"]) == case["repeats"] == model_level.repeats(cuda=False, quick=True)
            assert p["p20"] <= p["ms"] <= p["p80"] and p["peak_extra_mb"] is None  # CPU: not measured
            assert p["full_model_est_ms"] > p["ms"]
        assert set(provs["ours-torch"]["errors"]) == set(provs["stock"]["errors"])
        assert set(provs["ours-blocks"]["errors"]) == set(provs["stock"]["errors"])
    train = rec["cases"][1]["providers"]["ours-torch"]["errors"]
    assert any(k.startswith("grad.") and ".to_k.lora_A." in k for k in train)  # LoRA grads, stock naming
    md = report.markdown(rec)
    assert "model/train-512/b1/fwdbwd-r32-gc/n60 | ours-torch | ok" in md and "not measured" in md


def test_model_case_compiled_providers_verify_on_cpu():
    # inference only: compiling a training step of even a tiny model takes minutes on two CPU cores
    rec = runner.run([Case.parse("model/edit-1024/b1/fwd/n2")], ["stock", "stock-compile", "ours-compile"], CPU,
                     tiny=True, quick=True)
    for name, p in rec["cases"][0]["providers"].items():
        assert p["status"] == "ok" and len(p["samples_ms"]) == rec["cases"][0]["repeats"], (name, p.get("reason"))


# ------------------------------------------------------------------------------------------- bench/gpu_run.sh
GPU_RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_run.sh")
STEPS = ["setup", "tests-gpu", "check", "tune", "bench-opblock", "bench-model", "bench-train", "bench-model21", "tests-kernel",
         "host-time"]


def _plan(tmp_path, **env):
    """The QF_DRY=1 plan: {step: (est, budget, took)} in order, and the whole output."""
    proc = subprocess.run(["bash", GPU_RUN, str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "QF_DRY": "1", **env})
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    rows = {}
    for line in proc.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in STEPS + ["tile-sweep"]:
            rows[cells[0]] = tuple(None if c == "-" else int(c) for c in cells[1:4])
    return rows, proc.stdout


def test_gpu_run_is_one_call_inside_the_deadline(tmp_path):
    """bench/gpu_run.sh parses, runs the GPU tests first, and at its own estimates ends inside the 600 s a device
    command may take; its header's plan table is the one it runs."""
    assert subprocess.run(["bash", "-n", GPU_RUN]).returncode == 0
    for deadline in (540, 300):
        rows, out = _plan(tmp_path, QF_DEADLINE=str(deadline))
        assert list(rows) == STEPS, out
        used = sum(took or 0 for _, _, took in rows.values())
        assert used + 15 <= deadline, out  # 15: the default reserve for the summary
        assert all(budget is None or budget <= deadline for _, budget, _ in rows.values())
    rows, out = _plan(tmp_path)
    assert rows["tests-gpu"][1] > 0 and rows["bench-model"][2] is not None, out  # the priorities get their time
    text = open(GPU_RUN).read()
    # the default deadline, the kill grace after a budget (timeout -k 5) and the summary stay under 600 s
    deadline = int(re.search(r"DEADLINE=\$\{QF_DEADLINE:-(\d+)\}", text).group(1))
    grace = int(re.search(r"timeout -k (\d+) ", text).group(1))
    assert deadline + grace + 15 < 600
    # the header's table (est, cap, min) is the one the script runs (`step NAME EST CAP MIN FUNCTION`)
    runs = {m[0]: m[1:4] for m in (line.split()[1:] for line in text.splitlines() if line.startswith("step "))}
    header = {}
    for line in text.splitlines():
        cells = line.lstrip("# ").split()
        if cells and cells[0] in runs and cells[-3:] and all(c.isdigit() for c in cells[-3:]):
            header[cells[0]] = cells[-3:]
    assert header == {k: v for k, v in runs.items() if k != "tile-sweep"}, (header, runs)
    assert "QF_TILE_SWEEP" in text and "tile-sweep" not in rows  # the sweep only when asked for


def test_gpu_run_sweep_runs_last_when_asked(tmp_path):
    rows, out = _plan(tmp_path, QF_TILE_SWEEP="128,128,64,8,4")
    assert list(rows)[-1] == "tile-sweep", out


# ------------------------------------------------------------------------------------------- Qwen-Image 2.1
Q21_CASES = ["op/q21-edit-1024/b1/fwd", "block/q21-train-512/b1/fwdbwd-r32-gc", "model/q21-edit-1024/b1/fwd/n32",
             "model/q21-edit-1024/b1/fwdbwd-r32-gc/n32"]


def test_q21_cases_parse_and_have_the_real_sizes():
    from qwen_fused.bench import family21

    cases = [Case.parse(n) for n in Q21_CASES]
    assert [c.name for c in cases] == Q21_CASES and {c.family for c in cases} == {"qwenimage21"}
    assert [Case.parse(n).family for n in registry.Q21_CASES] == ["qwenimage21"] * len(registry.Q21_CASES)
    assert Case.parse(MODEL_CASES[0]).family == "qwenimage"
    # a 1024x1024 edit with one 1024x1024 condition image: 64x64 latent tokens each (16x16 pixels a token),
    # 1024 image slots in the text stream, 128 text tokens: a joint sequence of 8320
    assert registry.SHAPES["q21-edit-1024"] == (8192, 128)
    s = family21.Setup21(cases[2], CPU, tiny=False, blocks=32)
    assert (s.heads, s.head_dim, s.dim) == (32, 128, 4096)
    assert s.img_shapes[0] == [(1, 64, 64), (1, 64, 64)]
    assert s.inputs["encoder_hidden_states"].shape == (1, 128 + 1024, 4096)
    assert s.inputs["img_mask"].shape == (1, 128 + 1024 + 1024) and int(s.inputs["img_mask"].sum()) == 2048
    assert s.grad_out.shape == (1, 8320, 64)
    assert "img_mlp.gate_layer" in family21.STOCK_LORA_TARGETS and "to_v" in family21.STOCK_LORA_TARGETS


def test_q21_cases_verify_and_time_on_cpu():
    rec = runner.run([Case.parse(n) for n in Q21_CASES], ["stock", "ours-torch", "ours-swiglu", "ours-blocks"], CPU,
                     tiny=True, quick=True)
    json.dumps(rec)
    for case in rec["cases"]:
        provs = case["providers"]
        assert "ours-blocks" not in provs, case["case"]  # Qwen-Image's fuse_blocks: not a 2.1 provider
        for name in ("stock", "ours-torch"):
            assert provs[name]["status"] == "ok" and provs[name]["ms"] > 0, (case["case"], provs[name])
        assert set(provs["ours-torch"]["errors"]) == set(provs["stock"]["errors"])
    op, block, fwd, train = (c["providers"] for c in rec["cases"])
    assert set(op["stock"]["errors"]) == {"out0", "out1", "out2"}
    assert fwd["ours-swiglu"]["status"] == "ok" and train["ours-swiglu"]["status"] == "ok"
    assert set(train["ours-swiglu"]["errors"]) == set(train["stock"]["errors"])  # gate_up's LoRA split back
    assert "LoRA" in block["ours-swiglu"]["reason"]
    assert any(".img_mlp.gate_layer.lora_A." in k for k in block["stock"]["errors"])
    assert any(".to_qkv.lora_B." in k for k in block["ours-torch"]["errors"])  # merged naming at block level
    assert any(".attn.to_k.lora_A." in k for k in train["ours-torch"]["errors"])  # stock naming at model level
    assert rec["cases"][2]["blocks_run"] == model_level.TINY_MAX_BLOCKS and rec["cases"][2]["blocks"] == 32
    md = report.markdown(rec)
    assert "model/q21-edit-1024/b1/fwd/n32 | ours-swiglu | ok" in md, md
    report.terminal_table(rec)


def test_q21_wrong_providers_are_reported_not_timed(monkeypatch):
    import qwen_fused

    monkeypatch.setitem(PROVIDERS, "broken", Provider("broken", "deliberately wrong", _broken_ours))
    fuse = qwen_fused.fuse_qkv

    def bad_fuse(model):  # the model level fuses in place: a wrong fused weight must fail its verification
        fuse(model)
        with torch.no_grad():
            w = model.transformer_blocks[0].attn.to_qkv.weight
            w[-w.shape[0] // 3:] *= 1.25  # v 25% too large in the first block
        return model

    op = runner.run([Case.parse("op/q21-edit-1024/b1/fwd")], ["stock", "broken", "ours-torch"], CPU, tiny=True,
                    quick=True)["cases"][0]["providers"]
    assert op["broken"]["status"] == "wrong" and "out1" in op["broken"]["reason"] and "ms" not in op["broken"]
    assert op["ours-torch"]["status"] == "ok"
    monkeypatch.setattr(qwen_fused, "fuse_qkv", bad_fuse)
    model = runner.run([Case.parse("model/q21-edit-1024/b1/fwd/n2")], ["stock", "ours-torch"], CPU, tiny=True,
                       quick=True)["cases"][0]["providers"]
    assert model["ours-torch"]["status"] == "wrong" and "ms" not in model["ours-torch"]
    assert model["stock"]["status"] == "ok"
