"""Issue 21 for `qwen-fused convert`: no file it writes is silently misread downstream (no merged kohya files,
a note on merged output), a LoRA for another model is refused as `edit` refuses it, and an output folder that is
missing or read-only is one line naming the output (not the temporary), exit 2."""
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qwen_fused.cli import main


def standard_lora(path, prefix="transformer.", names=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = names or [f"transformer_blocks.{b}.attn.{n}" for b in range(2) for n in ("to_q", "to_k", "to_v")]
    sd = {}
    for n in names:
        sd[f"{prefix}{n}.lora_A.weight"] = torch.randn(2, 96, generator=g)
        sd[f"{prefix}{n}.lora_B.weight"] = torch.randn(96, 2, generator=g)
    save_file(sd, str(path))
    return path


def convert(*argv):
    return main(["convert", *map(str, argv)])


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qwen-fused convert: error: "), err
    return lines[0]


def test_merged_kohya_is_refused(tmp_path, capsys):
    src = standard_lora(tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    assert convert("--input", src, "--output", out, "--direction", "to_merged", "--format", "kohya") == 2
    line = one_error_line(capsys)
    assert "--format kohya" in line and "no to_qkv module" in line, line
    assert not out.exists()


def test_merged_output_says_who_reads_it(tmp_path, capsys):
    src = standard_lora(tmp_path / "in.safetensors")
    assert convert("--input", src, "--output", tmp_path / "m.safetensors", "--direction", "to_merged") == 0
    assert "give stock diffusers and ComfyUI the standard layout" in capsys.readouterr().out


def test_lora_for_another_model_is_refused_as_edit_refuses_it(tmp_path, capsys):
    """A Flux LoRA shares the attention names (to_q, add_q_proj, ...) but has modules Qwen-Image has not."""
    flux = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj",
            "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_k"]
    src = standard_lora(tmp_path / "flux.safetensors", names=flux)
    out = tmp_path / "out.safetensors"
    assert convert("--input", src, "--output", out, "--direction", "to_merged") == 2
    line = one_error_line(capsys)
    assert "not for Qwen-Image" in line and "single_transformer_blocks.0.proj_out" in line, line
    assert not out.exists()
    from qwen_fused import load_lora
    from qwen_fused.tiny import random_transformer

    with pytest.raises(ValueError, match="another model"):  # what `edit` does with it
        load_lora(random_transformer(0), str(src))


def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere on a writable file system: use one it cannot write
        return Path("/sys")
    return folder


@pytest.mark.parametrize("where", ["missing", "read_only"])
def test_unwritable_output_folder_is_one_line(where, tmp_path, capsys):
    src = standard_lora(tmp_path / "in.safetensors")
    folder = tmp_path / "no" / "such" if where == "missing" else read_only_folder(tmp_path)
    out = folder / "out.safetensors"
    assert convert("--input", src, "--output", out, "--direction", "to_merged") == 2
    line = one_error_line(capsys)
    assert f"cannot write {out}: folder {folder}" in line and ".tmp-" not in line, line
    assert ("does not exist" if where == "missing" else "cannot be written to") in line, line
