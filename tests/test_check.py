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


def _fuse_then_perturb(model):
    qwen_fused.fuse_qkv(model)
    with torch.no_grad():
        w = model.transformer_blocks[0].attn.to_qkv.weight
        w.add_(1e-3 * w.abs().max())
    return model


def test_check_fails_when_fused_is_worse(monkeypatch):
    monkeypatch.setattr(check, "fuse_qkv", _fuse_then_perturb)
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


def test_check_runs_qwen_image_21(monkeypatch, capsys):
    """2.1 is in the default run (tiny models; the real-width block unless --no-real-width), with the same table and
    criterion; a wrong fused 2.1 model fails."""
    names = [c.name for c in check.tiny21_cases()]
    assert len(names) == 2 and [c.name for c in check.real_width21_case(torch.device("cpu"))]
    monkeypatch.setattr(check, "tiny_cases", lambda: [])  # Qwen-Image's cases: the test above
    assert main(["check", "--device", "cpu", "--dtype", "fp32", "--no-real-width"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in names) and "PASS" in out
    rows, ok = check.run_check("cpu", "fp32", cases=check.tiny21_cases()[:1], verbose=False)
    assert ok and len(rows) == 5
    for _, quantity, fused_vs_stock, *_ in rows:  # fp32: fused is stock to rounding
        assert fused_vs_stock[1] < 1e-5, quantity

    monkeypatch.setattr(check, "fuse_qkv", _fuse_then_perturb)
    rows, ok = check.run_check("cpu", "fp32", cases=check.tiny21_cases()[:1], verbose=False)
    assert not ok and "WORSE" in check.format_table(rows)


def _fuse_then_scale(model, factor=1 + 1 / 32):
    qwen_fused.fuse_qkv(model)
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.attn.to_qkv.weight.mul_(factor)
    return model


def test_bf16_check_passes_and_catches_a_small_error(monkeypatch):
    """bf16: the float64 run gets the same rounded weights and inputs, and tiny cases pool several seeds, so the real
    fused model passes and a 3% scale error on to_qkv fails (with unrounded float64 inputs a 6% error passed)."""
    cases = [check.tiny_cases()[0], check.tiny21_cases()[0]]
    rows, ok = check.run_check("cpu", "bf16", cases=cases, verbose=False)
    assert ok, check.format_table(rows)
    monkeypatch.setattr(check, "fuse_qkv", _fuse_then_scale)
    rows, ok = check.run_check("cpu", "bf16", cases=cases, verbose=False)
    assert not ok
    assert {c for c, *_, good in rows if not good} == {c.name for c in cases}, check.format_table(rows)


def test_merged_swiglu_passes_in_fp32_and_bf16():
    """2.1's opt-in merged SwiGLU (on top of fused QKV): each gate_up gradient is lined up with stock's gate_layer /
    proj, and the model is stock to fp32 rounding and no further from float64 than stock in bf16."""
    def fuse(model):
        return qwen_fused.fuse_swiglu(qwen_fused.fuse_qkv(model))

    for dtype in ("fp32", "bf16"):
        rows, ok = check.run_check("cpu", dtype, cases=check.tiny21_cases(), verbose=False, fuse=fuse)
        assert ok, check.format_table(rows)
        if dtype == "fp32":
            assert all(fused_vs_stock[1] < 1e-5 for _, _, fused_vs_stock, *_ in rows), check.format_table(rows)
