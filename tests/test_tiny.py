"""The tiny offline pipelines: stock diffusers runs them, fusing gives the same image, save/load round-trips."""
import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE as STOCK_AREA
from helpers import random_image

import qwen_fused
from qwen_fused.numerics import rel_err
from qwen_fused.pipeline import call_pipeline
from qwen_fused.tiny import FIRST_SPECIAL_ID, SPECIAL_TOKENS, save_tiny_pipeline, tiny_edit_pipeline

AREA = 64 * 64  # condition-image area for fast runs (the stock pipelines use 1024 * 1024)


def _image(seed=0, size=(48, 64)):
    return random_image(size, seed)


def _edit(pipe, variant, area=AREA, **kw):
    images = _image() if variant == "edit" else [_image(0), _image(1, (64, 40))]
    kw = dict(image=images, prompt="make it red", num_inference_steps=2, true_cfg_scale=1.0, height=32, width=32,
              generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    return call_pipeline(pipe, area=area, **kw).images


def test_tokenizer_special_ids():
    pipe = tiny_edit_pipeline()
    tok = pipe.tokenizer
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == FIRST_SPECIAL_ID + i
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    ids = tok("<|vision_start|><|image_pad|><|vision_end|>ab")["input_ids"]
    assert ids[:3] == [151652, 151655, 151653] and len(ids) == 5
    assert pipe.text_encoder.config.image_token_id == 151655


@pytest.mark.parametrize("variant", ["edit", "2509", "2511"])
def test_fused_pipeline_same_image(variant):
    pipe = tiny_edit_pipeline(seed=0, variant=variant)
    assert pipe.transformer.config.zero_cond_t == (variant == "2511")
    stock = _edit(pipe, variant)
    assert stock.shape == (1, 3, 32, 32) and torch.isfinite(stock).all()
    qwen_fused.fuse_qkv(pipe)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.processor, qwen_fused.FusedQwenAttnProcessor)
    fused = _edit(pipe, variant)
    err_max, err_rms = rel_err(fused, stock)
    print(f"{variant}: image rel err max {err_max:.2e} rms {err_rms:.2e}")
    assert err_max < 1e-5 and err_rms < 1e-5
    # the comparison can fail: the image depends on the fused projection's weights
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].attn.to_qkv.weight.mul_(1.5)
    assert rel_err(_edit(pipe, variant), stock)[0] > 1e-3


def test_save_and_from_pretrained(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = save_tiny_pipeline(tmp_path / "tiny", seed=3, variant="2511")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "tiny")
    assert type(loaded) is type(pipe) and loaded.transformer.config.zero_cond_t
    for name in ("transformer", "vae", "text_encoder"):
        ref = getattr(pipe, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_edit(loaded, "2511"), _edit(pipe, "2511"))


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        tiny_edit_pipeline(variant="2600")


@pytest.mark.slow
def test_call_pipeline_stock_area_is_stock():
    """`call_pipeline` runs the stock __call__ code: at the stock area it gives exactly `pipe(...)`."""
    pipe = tiny_edit_pipeline(variant="2509")
    kw = dict(image=[_image()], prompt="x", num_inference_steps=1, true_cfg_scale=1.0, height=32, width=32,
              output_type="pt")
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    got = call_pipeline(pipe, area=STOCK_AREA, condition_area=384 * 384, generator=torch.Generator().manual_seed(0),
                        **kw).images
    assert torch.equal(ref, got)


@pytest.mark.slow
def test_saved_pipeline_loads_in_a_fresh_process_as_documented(tmp_path):
    """The loading code in tiny.py's docstring runs as written in a process that imported nothing else; without
    its import, diffusers itself says which module to import."""
    import re
    import subprocess
    import sys

    import qwen_fused.tiny

    doc_code = re.search(r"::\n\n((?:    .*\n)+)", qwen_fused.tiny.__doc__)
    assert doc_code, "tiny.py's docstring shows how to load a saved tiny pipeline"
    code = "\n".join(line[4:] for line in doc_code.group(1).splitlines())
    save_tiny_pipeline(tmp_path / "tiny", variant="2509")

    def run(code):
        return subprocess.run([sys.executable, "-c", f"path = {str(tmp_path / 'tiny')!r}\n{code}\n"
                               "print(type(pipe).__name__)"], capture_output=True, text=True, timeout=300)

    res = run(code)
    assert res.returncode == 0 and "QwenImageEditPlusPipeline" in res.stdout, res.stderr[-3000:]
    plain = run("\n".join(line for line in code.splitlines() if "qwen_fused" not in line))
    assert plain.returncode != 0 and "import qwen_fused.tiny" in plain.stderr
