"""`qwen-fused check`: passes on the real fused model, fails when the fused model is made wrong."""
import torch

import qwen_fused
from qwen_fused import check
from qwen_fused.cli import main


def test_check_passes_and_prints_table(capsys):
    rc = main(["check", "--device", "cpu", "--dtype", "fp32", "--no-real-width"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out and "grad q/k/v weights+biases" in out and "fused vs f64" in out


def test_check_fails_when_fused_is_worse(monkeypatch):
    def bad_fuse(model):
        qwen_fused.fuse_qkv(model)
        with torch.no_grad():
            w = model.transformer_blocks[0].attn.to_qkv.weight
            w.add_(1e-3 * w.abs().max())
        return model

    monkeypatch.setattr(check, "fuse_qkv", bad_fuse)
    rows, ok = check.run_check("cpu", "fp32", real_width=False, verbose=False)
    assert not ok
    assert any(not good for *_, good in rows)
    assert "WORSE" in check.format_table(rows)


def test_unusable_device_is_an_error_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, on any machine
    assert main(["check", "--device", "cuda", "--no-real-width"]) == 2
    err = capsys.readouterr().err
    assert "qwen-fused check: error: --device cuda: no cuda device available" in err and "--device cpu" in err
    assert main(["check", "--device", "gpu", "--no-real-width"]) == 2
    assert "qwen-fused check: error: --device gpu: not a device name" in capsys.readouterr().err
