"""`python -m qwen_fused.bench.host_time`: refuses without CUDA, and its `--cpu-smoke` mode runs both routes."""
import json
import subprocess
import sys

import pytest
import torch

from qwen_fused.bench import host_time


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert host_time.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--cpu-smoke" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refusal_exit_code_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "qwen_fused.bench.host_time"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr


def test_cpu_smoke_measures_both_routes(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert host_time.main(["--cpu-smoke", "--shapes", "train-512", "--rank", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["smoke"] and data["device"] == "cpu" and data["complete"] is True
    rows = data["rows"]
    assert [(r["case"], r["route"]) for r in rows] == [("infer", "op"), ("infer", "direct"), ("lora-r4", "op"),
                                                       ("lora-r4", "direct")]
    for r in rows:
        assert r["fwd_us"] > 0 and r["fwd_prof_us"] > 0 and r["fwd_wall_us"] >= r["fwd_us"]
        assert ("bwd_us" in r) == (r["case"] != "infer")
        assert all(len(t) == 2 for t in r["fwd_prof_top"])
    table = capsys.readouterr().out
    assert "fwd us" in table and "direct" in table
    # the routes were really taken: the custom op shows among the op route's profiled ops only
    if data["backend"] != "torch":
        op_names = [name for name, _ in rows[0]["fwd_prof_top"]]
        direct_names = [name for name, _ in rows[1]["fwd_prof_top"]]
        assert any("qwen_fused::joint_qkv" in n for n in op_names), op_names
        assert not any("qwen_fused::joint_qkv" in n for n in direct_names), direct_names


def test_json_is_written_row_by_row(tmp_path, monkeypatch):
    """A run cut after two rows leaves those two in the file, marked incomplete (the GPU script's time limit)."""
    out = tmp_path / "h.json"
    done = []

    def measure(shape, lora, route, **kw):
        if len(done) == 2:
            raise KeyboardInterrupt  # stands in for the limit: the tool is stopped in its third row
        done.append(dict(shape=shape, case=f"lora-r{lora}" if lora else "infer", route=route, fwd_us=1.0))
        return done[-1]

    monkeypatch.setattr(host_time, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        host_time.main(["--cpu-smoke", "--shapes", "train-512", "--rank", "4", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["rows"] == done and len(done) == 2
    assert data["planned"][2:] == [["train-512", "lora-r4", "op"], ["train-512", "lora-r4", "direct"]]
