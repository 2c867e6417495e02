"""`qwen-fused edit`: demo run, fused == stock (--no-fuse) with and without a LoRA, bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import random_image
from PIL import Image
from safetensors.torch import save_file

from qwen_fused.cli import main
from qwen_fused.pipeline import call_pipeline
from qwen_fused.tiny import save_tiny_pipeline, tiny_edit_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "tiny2509")
    save_tiny_pipeline(path, seed=0, variant="2509")
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return random_image(path=tmp_path_factory.mktemp("img") / "in.png")


@pytest.fixture(scope="module")
def lora(tmp_path_factory, model):
    """A random standard-layout LoRA (diffusers keys) on q/k/v and the output projections."""
    from diffusers import QwenImageTransformer2DModel

    base = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in base.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.to_out.0")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g)
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g)
    path = str(tmp_path_factory.mktemp("lora") / "lora.safetensors")
    save_file(sd, path)
    return path


def _edit(model, image, out, *extra):
    return main(["edit", "--model", model, "--image", image, "--image", image, "--prompt", "make it red",
                 "--steps", "2", "--true_cfg_scale", "1", "--height", "32", "--width", "32", "--area", "4096",
                 "--output", str(out), *extra])


def _pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)


def test_edit_demo_writes_png(tmp_path):
    out = tmp_path / "demo.png"
    assert main(["edit", "--demo", "--output", str(out)]) == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (32, 32)


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_fused_equals_stock(model, image, lora, tmp_path, with_lora):
    extra = ["--lora", f"{lora}:0.5"] if with_lora else []
    assert _edit(model, image, tmp_path / "fused.png", *extra) == 0
    assert _edit(model, image, tmp_path / "stock.png", "--no-fuse", *extra) == 0
    fused, stock = _pixels(tmp_path / "fused.png"), _pixels(tmp_path / "stock.png")
    assert np.abs(fused - stock).max() <= 1  # 8-bit rounding of equal fp32 images
    if with_lora:
        assert _edit(model, image, tmp_path / "merged.png", "--lora", f"{lora}:0.5", "--fuse_lora") == 0
        assert np.abs(_pixels(tmp_path / "merged.png") - stock).max() <= 1
        assert _edit(model, image, tmp_path / "base.png") == 0
        assert np.abs(_pixels(tmp_path / "base.png") - stock).max() > 2  # the LoRA changes the image


def test_area_sets_default_size():
    pipe = tiny_edit_pipeline(variant="edit")
    img = Image.new("RGB", (96, 48))
    out = call_pipeline(pipe, area=64 * 64, image=img, prompt="x", num_inference_steps=1, true_cfg_scale=1.0,
                        output_type="pt").images
    assert out.shape[-2:] == (32, 96)  # calculate_dimensions(64 * 64, 2.0): 96 x 32


def test_true_cfg_only_with_negative_prompt(model, image, tmp_path):
    """Without --negative_prompt there is no true CFG, and diffusers is not handed a scale it would ignore with a
    warning on every run; the image is the one without CFG. With one, the pipeline's own scale applies."""
    import logging

    class Grab(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    def edit(out, *extra):  # as `_edit`, but leaving --true_cfg_scale to its default
        return main(["edit", "--model", model, "--image", image, "--image", image, "--prompt", "make it red",
                     "--steps", "2", "--height", "32", "--width", "32", "--area", "4096",
                     "--output", str(tmp_path / out), *extra])

    grab, logger = Grab(), logging.getLogger("diffusers")  # diffusers' loggers stop there (no propagation)
    level = logger.level
    logger.addHandler(grab)
    logger.setLevel(logging.WARNING)
    try:
        assert edit("plain.png") == 0
        assert edit("neg.png", "--negative_prompt", "blue") == 0
    finally:
        logger.removeHandler(grab)
        logger.setLevel(level)
    assert not [m for m in grab.messages if "guidance" in m], grab.messages
    assert _edit(model, image, tmp_path / "no_cfg.png") == 0  # --true_cfg_scale 1
    assert np.array_equal(_pixels(tmp_path / "plain.png"), _pixels(tmp_path / "no_cfg.png"))
    assert edit("neg4.png", "--negative_prompt", "blue", "--true_cfg_scale", "4") == 0
    assert np.array_equal(_pixels(tmp_path / "neg.png"), _pixels(tmp_path / "neg4.png"))
    # CFG took effect (the tiny random model's prompts move few pixels; runs on CPU in fp32 repeat exactly)
    assert not np.array_equal(_pixels(tmp_path / "neg.png"), _pixels(tmp_path / "plain.png"))


def test_help_shows_defaults_and_every_flag_has_help():
    from test_train import assert_every_flag_has_help, help_entries, subcommand_parser

    _, edit = subcommand_parser("edit")
    assert_every_flag_has_help(edit)
    lines = help_entries(edit)
    assert "(default: 50)" in lines["--steps"] and "(default: 0)" in lines["--seed"]
    assert "4.0" in lines["--true_cfg_scale"] and "--negative_prompt" in lines["--true_cfg_scale"]


@pytest.mark.parametrize("case,needle", [
    ("missing_image", "cannot read image"),
    ("empty_prompt", "--prompt is empty"),
    ("output_exists", "exists; pass --overwrite"),
    ("missing_lora", "--lora"),
    ("no_model", "does not exist"),
    ("unwritable", "not a writable folder"),
    ("bad_scale", "bad scale 'abc' in --lora "),
])
def test_bad_input(case, needle, model, image, tmp_path, capsys):
    args = ["edit", "--model", model, "--image", image, "--prompt", "x", "--output", str(tmp_path / "o.png")]
    if case == "missing_image":
        args[4] = str(tmp_path / "nope.png")
    elif case == "empty_prompt":
        args[6] = " "
    elif case == "output_exists":
        (tmp_path / "o.png").write_bytes(b"keep me")
    elif case == "missing_lora":
        args += ["--lora", str(tmp_path / "none.safetensors")]
    elif case == "no_model":
        args[2] = str(tmp_path / "no_model")
    elif case == "unwritable":
        args[-1] = str(tmp_path / "no_folder" / "o.png")
    elif case == "bad_scale":  # an existing file and a scale that is not a number
        args += ["--lora", f"{image}:abc"]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    if case == "output_exists":
        assert (tmp_path / "o.png").read_bytes() == b"keep me"


def test_unusable_device_is_an_error_line(model, image, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, on any machine
    assert main(["edit", "--model", model, "--image", image, "--prompt", "x", "--output", str(tmp_path / "o.png"),
                 "--device", "cuda"]) == 2
    assert "qwen-fused edit: error: --device cuda: no cuda device available" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_demo_leaves_nothing_in_temp(tmp_path):
    """The demo's tiny model and input image (~36 MB) go when the command ends; the output image stays."""
    temp, out = tmp_path / "temp", tmp_path / "demo.png"
    temp.mkdir()
    res = subprocess.run([sys.executable, "-m", "qwen_fused.cli", "edit", "--demo", "--steps", "1", "--output",
                          str(out)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TMPDIR=str(temp)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(temp) in res.stdout  # the demo did use this temp folder
    assert Image.open(out).size == (32, 32)
    assert not list(temp.iterdir())


def test_compile_gives_the_same_image(model, image, lora, tmp_path):
    """`--compile` (inductor on this CPU) with a LoRA: the same image as eager."""
    assert _edit(model, image, tmp_path / "eager.png", "--lora", lora, "--no-compile") == 0
    assert _edit(model, image, tmp_path / "compiled.png", "--lora", lora, "--compile") == 0
    assert np.abs(_pixels(tmp_path / "compiled.png") - _pixels(tmp_path / "eager.png")).max() <= 1
