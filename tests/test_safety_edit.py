"""Issue 21 for `qwen-fused edit` and `check`: the output's bytes are what its extension says, an extension with no
image format is one line before any model loads, and `check` prints the margin it allows."""
import pytest
from helpers import random_image

from qwen_fused.cli import main
from qwen_fused.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "tiny")
    save_tiny_pipeline(path, seed=0, variant="edit")
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return random_image(path=tmp_path_factory.mktemp("img") / "in.png")


def edit(model, image, out, *extra):
    return main(["edit", "--model", model, "--image", image, "--prompt", "x", "--steps", "1", "--height", "32",
                 "--width", "32", "--area", "4096", "--output", str(out), *extra])


@pytest.mark.parametrize("name,magic", [("o.jpg", b"\xff\xd8\xff"), ("o.JPEG", b"\xff\xd8\xff"),
                                        ("o.png", b"\x89PNG"), ("o.webp", b"RIFF")])
def test_output_format_follows_the_extension(name, magic, model, image, tmp_path):
    assert edit(model, image, tmp_path / name) == 0
    assert (tmp_path / name).read_bytes()[:len(magic)] == magic


@pytest.mark.parametrize("name", ["o.txt", "o"])
def test_output_without_an_image_extension_is_one_line(name, model, image, tmp_path, capsys):
    assert edit(model, image, tmp_path / name) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qwen-fused edit: error: --output {tmp_path / name}: no image format") and "\n" not in err
    assert not (tmp_path / name).exists()


def test_check_prints_the_margin_it_allows(capsys):
    from qwen_fused import check

    assert main(["check", "--device", "cpu", "--dtype", "fp32", "--no-real-width"]) == 0
    out = capsys.readouterr().out
    m_max, m_rms = check.MARGIN["fp32"]
    assert (f"PASS: fused is within {m_max:g}x (max) / {m_rms:g}x (RMS) stock's error vs float64 + "
            f"{check.FLOOR_EPS32} fp32 eps") in out
    assert "no further from float64 than stock" not in out
