"""Qwen-Image 2.1 training and editing (issue 20, item 5), on the tiny random 2.1 pipeline, offline, fp32 on CPU.

The training batch against what `QwenImage21Pipeline` hands its transformer; the sigmas against the scheduler's
own dynamic shift; the loss on the target rows only; `qwen-fused train` (SIGTERM, resume = uninterrupted, both
layouts) and `qwen-fused edit` on a 2.1 model folder, whose standard-layout LoRA gives the same image in the stock
pipeline through `load_lora_weights`. Text-to-image: rows without edit_image (a CSV of `image, prompt`, a JSON
mixing 0, 1 and 2 condition images), the batch against the pipeline called without `image`, `edit` without
--image; the edit models still need an edit_image / --image.
"""
import os
import signal

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import assert_close, random_image
from PIL import Image
from safetensors.torch import load_file

from qwen_fused import data as D
from qwen_fused import train as T
from qwen_fused.cli import main
from qwen_fused.demo import make_demo_dataset
from qwen_fused.families import qwenimage21_train as Q
from qwen_fused.families import tiny21_pipeline  # noqa: F401  (the tiny processor class, for from_pretrained)
from qwen_fused.families.tiny21_pipeline import save_tiny_pipeline, tiny_pipeline
from qwen_fused.pipeline import edit_variant, load_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "tiny21")
    save_tiny_pipeline(path, seed=0)
    return path


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def json_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data21")
    return str(folder), make_demo_dataset(str(folder), n=2, edits=2)


def _image(folder, name, size, seed):
    return random_image(size, seed, os.path.join(folder, name))


def test_variant_is_found_from_the_model_folder(model):
    assert edit_variant(load_pipeline(model)) == "2.1"


@pytest.mark.parametrize("n_cond", [2, 0], ids=["two-conditions", "text-to-image"])
def test_batch_matches_what_the_pipeline_gives_its_transformer(pipe, tmp_path, n_cond):
    """Our encoded sample + FlowMatching21's batch at sigma 1 against the stock pipeline's first transformer call:
    condition latents first, the (pure-noise) target last, the text stream with the condition-image slots, the
    target's slots appended to img_mask, img_shapes, timestep. Text-to-image (a row without edit_image, the
    pipeline called without `image`): the target alone, the text-to-image prompt template, no condition slots.
    The second call's timestep is the scheduler's dynamic shift of sigma 0.5 by the target's length, as
    FlowMatching21 shifts."""
    cond = _image(tmp_path, "c.png", (64, 64), 1)
    target = _image(tmp_path, "t.png", (64, 64), 2)
    prompts = ["make it redder", "red"]  # batch 2, the second prompt padded
    records = [D.Record(target, (cond,) * n_cond, p, "test") for p in prompts]
    batch = D.collate([Q.encode_sample(pipe, r, D.plan_sample(r, 64 * 64, None), "cpu") for r in records])
    assert len(batch["edits"]) == n_cond

    seen = []
    def record(module, args, kwargs):
        seen.append(kwargs)  # returns None: the inputs stay as they are

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        img = D.open_rgb(cond)
        pipe(prompt=prompts, image=[img] * n_cond or None, height=64, width=64, output_resolution=64,
             num_inference_steps=2, use_kv_cache=False, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    ref = seen[0]
    n_target = 4 * 4
    x0 = batch["target"]
    noise = ref["hidden_states"][:, -n_target:].transpose(1, 2).reshape(x0.shape)  # the pipeline's initial latents

    ours = {}

    def spy(**kw):
        ours.update(kw)
        return (torch.zeros_like(kw["hidden_states"]),)

    flow = Q.FlowMatching21(pipe.scheduler)
    t0 = ref["timestep"] * 1000
    Q.FlowMatching21.loss(flow, spy, batch, noise=noise, timesteps=t0, sigmas=torch.ones(2))
    assert ref["hidden_states"].shape[1] == (n_cond + 1) * n_target
    assert_close(ours["hidden_states"], ref["hidden_states"], 1e-6, "hidden_states")
    assert_close(ours["encoder_hidden_states"], ref["encoder_hidden_states"], 1e-6, "encoder_hidden_states")
    assert torch.equal(ours["img_mask"], ref["img_mask"].bool())
    assert (ref["img_mask"].sum(1) == n_cond * 4 + 4).all()  # the conditions and the target, 4 slots each
    assert [list(map(tuple, s)) for s in ours["img_shapes"]] == [list(map(tuple, s)) for s in ref["img_shapes"]]
    assert len(ref["img_shapes"][0]) == n_cond + 1
    mask = ref["encoder_hidden_states_mask"]
    assert mask is not None and not mask[1].all() and torch.equal(ours["encoder_hidden_states_mask"], mask.bool())
    assert torch.equal(ours["timestep"], ref["timestep"])
    shifted = flow.scheduler.time_shift(flow.mu(n_target), 1.0, torch.tensor(0.5))
    assert_close(seen[1]["timestep"], shifted.expand(2).float(), 1e-6, "second timestep")


def test_sigmas_are_the_schedulers_dynamic_shift(pipe):
    """FlowMatching21 draws a sigma of the scheduler's table and shifts it as `set_timesteps(sigmas, mu)` does for
    the target's sequence length (`calculate_shift`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = Q.FlowMatching21(pipe.scheduler)
    assert pipe.scheduler.config.use_dynamic_shifting
    for seq_len in (16, 1024, 4096):
        torch.manual_seed(0)
        timesteps, sigmas = flow.sample(5, "cpu", image_seq_len=seq_len)
        torch.manual_seed(0)
        idx = (torch.rand(5) * 1000).long().clamp_(max=999)
        ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        ref.set_timesteps(sigmas=flow.sigmas[idx].tolist(), mu=flow.mu(seq_len))
        assert_close(sigmas, ref.sigmas[:-1], 1e-6, f"sigmas at {seq_len}")
        assert_close(timesteps, ref.timesteps, 1e-6, f"timesteps at {seq_len}")
    # the shift does depend on the length (a longer sequence is noisier)
    torch.manual_seed(0)
    short = flow.sample(5, "cpu", image_seq_len=16)[1]
    torch.manual_seed(0)
    long = flow.sample(5, "cpu", image_seq_len=4096)[1]
    assert (long > short).all()


def test_loss_is_on_the_target_rows_only(pipe):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 64, 1, 2, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    batch = {"target": x0, "edits": [torch.randn(2, 64, 1, 2, 2, generator=g)],
             "prompt_embeds": torch.randn(2, 5, 16, generator=g), "prompt_embeds_mask": None,
             "img_mask": torch.tensor([[False, True, False, False, False]] * 2)}
    velocity = Q.pack(noise - x0)

    def model(garbage_at):
        def forward(**kw):
            out = torch.randn(kw["hidden_states"].shape, generator=g)
            if garbage_at == "conditions":
                out[:, -velocity.shape[1]:] = velocity
            return (out,)
        return forward

    flow = Q.FlowMatching21(pipe.scheduler)
    kw = dict(noise=noise, timesteps=torch.full((2,), 500.0), sigmas=torch.full((2,), 0.5))
    assert Q.FlowMatching21.loss(flow, model("conditions"), batch, **kw)[0] == 0
    assert Q.FlowMatching21.loss(flow, model("everywhere"), batch, **kw)[0] > 0.1


def _train(model, data, out, *extra):
    return T.main(["--pretrained_model_name_or_path", model, "--dataset_base_path", data[0],
                   "--dataset_metadata_path", data[1], "--output_dir", str(out), "--max_pixels", "4096",
                   "--lora_rank", "4", "--save_steps", "100", "--learning_rate", "1e-2", *extra])


@pytest.fixture(scope="module")
def trained(model, json_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run21") / "full"
    assert _train(model, json_data, out, "--max_train_steps", "3") == 0
    return out


def test_train_saves_both_layouts_with_the_2_1_targets(trained):
    standard = load_file(trained / "checkpoint-final.safetensors")
    merged = load_file(trained / "checkpoint-final-merged.safetensors")
    assert any(".attn.to_q." in k for k in standard) and not any("to_qkv" in k for k in standard)
    assert any(".attn.to_qkv." in k for k in merged)
    for name in ("to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"):
        assert any(f".{name}.lora_B" in k for k in standard), name
    assert any(v.abs().max() > 0 for k, v in standard.items() if "lora_B" in k)  # it trained


def test_sigterm_then_resume_matches_uninterrupted(model, json_data, trained, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    loss = Q.FlowMatching21.loss

    def loss_then_term(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *a, **k)

    monkeypatch.setattr(Q.FlowMatching21, "loss", loss_then_term)
    out = tmp_path / "part"
    # --cache here only: the resumed run trains on the cached samples (img_mask too) and must still match
    assert _train(model, json_data, out, "--max_train_steps", "3", "--cache") == 128 + signal.SIGTERM
    assert os.path.isfile(out / "state" / "checkpoint-2" / "train_state.json")
    monkeypatch.setattr(Q.FlowMatching21, "loss", loss)
    assert _train(model, json_data, out, "--max_train_steps", "3", "--cache",
                  "--resume_from_checkpoint", "latest") == 0
    assert "2 samples reused, 0 encoded" in capsys.readouterr().out
    a, b = load_file(trained / "checkpoint-final.safetensors"), load_file(out / "checkpoint-final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], 1e-6, k)


def test_edit_with_trained_lora_equals_stock_load_lora_weights(model, json_data, trained, tmp_path):
    lora = str(trained / "checkpoint-final.safetensors")
    image = os.path.join(json_data[0], "images", "0_edit0.png")
    out = tmp_path / "fused.png"
    argv = ["edit", "--model", model, "--image", image, "--image", image, "--prompt", "make it redder", "--steps",
            "2", "--height", "32", "--width", "64", "--area", "4096", "--output", str(out)]
    assert main([*argv, "--lora", lora]) == 0
    img = D.open_rgb(image)
    assert_stock_pipeline_gives(out, model, lora, prompt="make it redder", image=[img, img])


def assert_stock_pipeline_gives(png, model, lora, **call):
    """The stock QwenImage21Pipeline (no qwen_fused involved) with `load_lora_weights(lora)` gives the image `png`
    within 1/255 per pixel, and the LoRA changes its image (so the comparison means something)."""
    fused = np.asarray(Image.open(png)).astype(np.int16)
    stock = DiffusionPipeline.from_pretrained(model)
    kw = dict(call, num_inference_steps=2, height=32, width=64, output_resolution=64, true_cfg_scale=1.0)
    plain = stock(**kw, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    stock.load_lora_weights(lora)
    with_lora = stock(**kw, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(np.asarray(with_lora).astype(np.int16) - fused).max() <= 1
    lora_np = stock(**kw, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(lora_np - plain).max() > 1e-3


def test_edit_and_train_demo_2_1(tmp_path):
    assert main(["edit", "--demo", "--demo_variant", "2.1", "--output", str(tmp_path / "demo.png")]) == 0
    assert Image.open(tmp_path / "demo.png").size == (32, 32)
    image = _image(tmp_path, "v.png", (64, 48), 3)
    assert main(["train", "--demo", "--demo_variant", "2.1", "--output_dir", str(tmp_path / "run"),
                 "--max_train_steps", "2", "--validation_image", image, "--validation_prompt", "redder",
                 "--validation_steps", "2", "--validation_inference_steps", "1"]) == 0
    assert os.path.isfile(tmp_path / "run" / "checkpoint-final.safetensors")
    assert Image.open(tmp_path / "run" / "validation" / "step-2.png").size == (64, 64)  # area 64 * 64


def test_condition_area_is_refused_on_2_1(model, json_data, tmp_path, capsys):
    assert _train(model, json_data, tmp_path / "r", "--condition_area", "4096") == 2
    assert "--condition_area: Qwen-Image 2.1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# text-to-image: rows without edit_image

@pytest.fixture(scope="module")
def t2i_csv(json_data):
    """A CSV with `image, prompt` only (no edit_image column), the demo's target images."""
    import csv

    base = json_data[0]
    path = os.path.join(base, "t2i.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "prompt"])
        w.writeheader()
        w.writerows([{"image": f"images/{i}_target.png", "prompt": f"a red picture {i}"} for i in range(2)])
    return base, path


@pytest.fixture(scope="module")
def mixed_json(json_data):
    """0, 1 and 2 condition images in one JSON, every spelling of 'none' (no key, null, [])."""
    import json

    base = json_data[0]
    rows = [{"image": "images/0_target.png", "prompt": "red"},
            {"image": "images/1_target.png", "edit_image": None, "prompt": "redder"},
            {"image": "images/0_target.png", "edit_image": [], "prompt": "reddest"},
            {"image": "images/1_target.png", "edit_image": "images/1_edit0.png", "prompt": "make it redder"},
            {"image": "images/0_target.png", "edit_image": ["images/0_edit0.png"], "prompt": "make it red"},
            {"image": "images/0_target.png", "edit_image": ["images/0_edit0.png", "images/0_edit1.png"],
             "prompt": "make it redder"}]
    path = os.path.join(base, "mixed.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return base, path


def test_rows_without_edit_image_read_as_text_to_image(t2i_csv, mixed_json):
    """Edit models' rule stays the default; without it a missing edit_image is no condition image, and the
    counts may mix: each count has its own bucket and cache key (same target, same size)."""
    with pytest.raises(D.DataError, match=r"t2i\.csv: missing column\(s\) edit_image"):
        D.read_metadata(*t2i_csv)
    with pytest.raises(D.DataError, match=r"mixed\.json item 0: missing edit_image"):
        D.read_metadata(*mixed_json)
    assert [len(r.edit_images) for r in D.read_metadata(*t2i_csv, require_conditions=False)] == [0, 0]
    records = D.read_metadata(*mixed_json, require_conditions=False)
    assert [len(r.edit_images) for r in records] == [0, 0, 0, 1, 1, 2]
    D.check_conditions(records, text_to_image=True)
    plans = [D.plan_sample(r, 4096, None) for r in records]
    assert len({p.bucket for p in plans}) == 3 and len({p.target for p in plans}) == 1
    t2i, edit = records[2], records[4]  # same target and prompt... but for the condition image
    t2i = D.Record(t2i.image, (), edit.prompt, t2i.line)
    assert (D.sample_key(t2i, D.plan_sample(t2i, 4096, None), "m")
            != D.sample_key(edit, D.plan_sample(edit, 4096, None), "m"))


def test_train_text_to_image_csv(model, t2i_csv, tmp_path, capsys):
    """`qwen-fused train` on a CSV with `image, prompt` only: no condition latents, no condition slots; a
    `--validation_prompt` without `--validation_image` validates text-to-image (a square of --max_pixels)."""
    seen = []
    loss = Q.FlowMatching21.loss

    def spy(self, transformer, batch, *a, **k):
        seen.append((len(batch["edits"]), bool(batch["img_mask"].any())))
        return loss(self, transformer, batch, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Q.FlowMatching21, "loss", spy)
        assert _train(model, t2i_csv, tmp_path / "run", "--max_train_steps", "2", "--validation_prompt", "redder",
                      "--validation_steps", "2", "--validation_inference_steps", "1") == 0, capsys.readouterr().err
    assert seen == [(0, False)] * 2
    assert Image.open(tmp_path / "run" / "validation" / "step-2.png").size == (64, 64)
    standard = load_file(tmp_path / "run" / "checkpoint-final.safetensors")
    assert any(v.abs().max() > 0 for k, v in standard.items() if "lora_B" in k)


def test_train_mixed_json_batches_one_count_each(model, mixed_json, tmp_path, capsys):
    """0, 1 and 2 condition images in one dataset, batch 2, cached: every batch holds one count (the buckets),
    every sample trains once per epoch, and a second run reuses all six cached samples."""
    seen = []
    loss = Q.FlowMatching21.loss

    def spy(self, transformer, batch, *a, **k):
        n = len(batch["edits"])
        # the text stream's condition slots: 2 per condition image (64x32 pixels: 4x2 latent tokens, a slot per 2x2)
        assert (batch["img_mask"].sum(1) == 2 * n).all()
        seen.append((batch["target"].shape[0], n))
        return loss(self, transformer, batch, *a, **k)

    args = ("--num_epochs", "1", "--train_batch_size", "2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Q.FlowMatching21, "loss", spy)
        assert _train(model, mixed_json, tmp_path / "run", *args, "--cache") == 0, capsys.readouterr().err
        # (batch size, condition images): 3 text-to-image samples, 2 with one condition image, 1 with two
        assert sorted(seen) == [(1, 0), (1, 2), (2, 0), (2, 1)]
        assert "6 encoded" in capsys.readouterr().out
        assert _train(model, mixed_json, tmp_path / "again", *args, "--cache", str(tmp_path / "run" / "cache"),
                      "--max_train_steps", "1") == 0
    assert "6 samples reused, 0 encoded" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_t2i(model, t2i_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("run21") / "t2i"
    assert _train(model, t2i_csv, out, "--max_train_steps", "3") == 0
    return out


def test_text_to_image_lora_in_stock_pipeline_equals_edit_without_image(model, trained_t2i, tmp_path):
    """The standard-layout LoRA of a text-to-image run in the stock QwenImage21Pipeline (`load_lora_weights`,
    called without `image`) gives `qwen-fused edit`'s image without --image (fused, the same LoRA)."""
    lora = str(trained_t2i / "checkpoint-final.safetensors")
    out = tmp_path / "fused.png"
    argv = ["edit", "--model", model, "--prompt", "a red picture 0", "--steps", "2", "--height", "32", "--width",
            "64", "--area", "4096", "--output", str(out)]
    assert main([*argv, "--lora", lora]) == 0
    assert Image.open(out).size == (64, 32)
    assert_stock_pipeline_gives(out, model, lora, prompt="a red picture 0")


@pytest.fixture(scope="module")
def edit_model(tmp_path_factory):
    from qwen_fused.tiny import save_tiny_pipeline as save_edit

    path = str(tmp_path_factory.mktemp("m") / "tiny-edit")
    save_edit(path, seed=0, variant="edit")
    return path


def _no_loading(mp):
    """Loading a pipeline fails the test: what model_index.json tells is checked before."""
    from qwen_fused import pipeline as P

    def load(*a, **k):
        raise AssertionError("the pipeline was loaded")

    mp.setattr(T, "load_pipeline", load)
    mp.setattr(P, "load_pipeline", load)


@pytest.mark.parametrize("data", ["t2i_csv", "mixed_json"])
@pytest.mark.parametrize("known", [True, False], ids=["from-model_index", "once-loaded"])
def test_edit_model_still_needs_edit_image(edit_model, data, known, request, tmp_path, monkeypatch, capsys):
    """A Qwen-Image-Edit model: a row without edit_image is one line naming the row, before loading when
    model_index.json is at hand, else once the model is loaded (a Hub id not downloaded yet), before any encoding."""
    from qwen_fused import encode as E
    from qwen_fused import pipeline as P

    called = []
    monkeypatch.setattr(E, "encode_sample", lambda *a, **k: called.append(1))
    if known:
        _no_loading(monkeypatch)
    else:
        monkeypatch.setattr(T, "needs_condition_image", lambda path: None)
        assert P.needs_condition_image(edit_model) is True
    assert _train(edit_model, request.getfixturevalue(data), tmp_path / "r") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1:]  # the last line: after any loading bars
    row = "t2i.csv row 2" if data == "t2i_csv" else "mixed.json item 0"
    assert err == [f"qwen-fused train: error: {row}: missing edit_image (an edit model needs a condition image per "
                   f"sample; rows without one train text-to-image on Qwen-Image 2.1 only)"], err
    assert not called and not os.path.exists(tmp_path / "r")


def test_edit_without_image_needs_2_1(edit_model, tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    assert main(["edit", "--model", edit_model, "--prompt", "x", "--output", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qwen-fused edit: error: at least one --image is required (Qwen-Image-Edit edits an image; only "
                   "Qwen-Image 2.1 generates from text alone)"], err
    assert not os.path.exists(tmp_path / "o.png")


def test_text_to_image_qwen_image_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """A Qwen-Image text-to-image folder (QwenImagePipeline): one line from train and edit, nothing loaded."""
    _no_loading(monkeypatch)
    folder = tmp_path / "qwen-image"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    image = _image(tmp_path, "i.png", (32, 32), 0)
    assert main(["edit", "--model", str(folder), "--image", image, "--prompt", "x"]) == 2
    assert main(["train", "--pretrained_model_name_or_path", str(folder), "--dataset_base_path", str(tmp_path),
                 "--dataset_metadata_path", _t2i_csv_at(tmp_path, image), "--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(f"{folder}: QwenImagePipeline is not supported" in line for line in err), err
    assert all("Qwen-Image text-to-image (QwenImagePipeline) is not" in line for line in err), err


def _t2i_csv_at(folder, image):
    path = os.path.join(folder, "t2i.csv")
    with open(path, "w") as f:
        f.write(f"image,prompt\n{os.path.basename(image)},a prompt\n")
    return path


def test_training_step_matches_stock_peft(pipe, tmp_path):
    """One loss and every LoRA gradient on a 2.1 batch (two condition images, batch 2 with padded text): the fused
    transformer with the family's default targets (one LoRA over to_qkv) against stock diffusers + peft on
    to_q/to_k/to_v with the same model (shared A, B split by rows)."""
    import copy

    from qwen_fused import fuse_qkv
    from qwen_fused import train_lora as L
    from qwen_fused import train_state as S
    from qwen_fused.families import qwenimage21
    from qwen_fused.names import STREAMS

    cond = _image(tmp_path, "c.png", (64, 32), 1)
    records = [D.Record(_image(tmp_path, f"t{i}.png", (64, 32), 2 + i), (cond, cond), prompt, "test")
               for i, prompt in enumerate(["make it redder", "red"])]
    samples = [Q.encode_sample(pipe, r, D.plan_sample(r, 64 * 64, None), "cpu") for r in records]
    batch = D.collate(samples)
    assert batch["prompt_embeds_mask"] is not None and batch["img_mask"].shape == batch["prompt_embeds"].shape[:2]

    stock = copy.deepcopy(pipe.transformer)
    fused = fuse_qkv(copy.deepcopy(stock))
    for m in (stock, fused):
        m.requires_grad_(False)
    targets = list(qwenimage21.LORA_TARGETS)
    L.add_training_lora(fused, 4, 8.0, targets)
    L.add_training_lora(stock, 4, 8.0, L.stock_targets(targets))
    g = torch.Generator().manual_seed(1)
    fsd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in S.lora_state(fused).items()}
    S.set_lora_state(fused, fsd)
    ssd = {}
    for k, v in fsd.items():
        module, leaf = k.split(".lora_")
        parent, name = module.rsplit(".", 1)
        parts = STREAMS.get(name, (name,))
        for i, part in enumerate(parts):
            ssd[f"{parent}.{part}.lora_{leaf}"] = v if leaf.startswith("A") or len(parts) == 1 else v.chunk(3)[i]
    S.set_lora_state(stock, ssd)

    flow = Q.FlowMatching21(pipe.scheduler, weighting_scheme="cosmap")
    torch.manual_seed(3)
    loss_f, d = flow.loss(fused, batch)
    loss_s, _ = flow.loss(stock, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
    loss_f.backward()
    loss_s.backward()
    assert_close(loss_f.detach(), loss_s.detach(), 1e-5, "loss")
    sg = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    fg = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert len(fg) == 2 * len(targets) * len(fused.transformer_blocks)
    for name, grad in fg.items():
        assert grad is not None and grad.abs().max() > 0, name
        module, leaf = name.split(".lora_")
        parent, part = module.rsplit(".", 1)
        if part in STREAMS:
            parts = [sg[f"{parent}.{p}.lora_{leaf}"] for p in STREAMS[part]]
            ref = sum(parts) if leaf.startswith("A") else torch.cat(parts)
        else:
            ref = sg[name]
        assert_close(grad, ref, 1e-5, name)


@pytest.mark.slow
def test_compile_and_fp8_base_on_2_1(model, json_data, trained, tmp_path, monkeypatch, capsys):
    """As for Qwen-Image-Edit: `--compile` (inductor on this CPU; diffusers' compile_repeated_blocks on the 2.1
    blocks) trains the eager run's LoRA (`trained`: the same 3 steps), and `--fp8_base` trains with float8 base
    weights under diffusers' layerwise casting (to_qkv included), giving a LoRA near the full-precision one."""
    from qwen_fused import train_lora as TL

    assert _train(model, json_data, tmp_path / "compiled", "--max_train_steps", "3", "--compile") == 0
    assert "blocks compiled" in capsys.readouterr().out
    eager = load_file(trained / "checkpoint-final.safetensors")
    compiled = load_file(tmp_path / "compiled" / "checkpoint-final.safetensors")
    assert eager.keys() == compiled.keys()
    for k in eager:  # 3 Adam steps at lr 1e-2 amplify inductor's fp32 reordering (seen: max 1.3e-4, RMS 1.4e-5)
        assert_close(compiled[k], eager[k], 1e-3, k)

    seen = []
    enable = TL.enable_fp8_base

    def spy(transformer, dtype):
        out = enable(transformer, dtype)
        seen.append({transformer.transformer_blocks[0].attn.to_qkv.base_layer.weight.dtype,
                     transformer.transformer_blocks[0].img_mlp.proj.base_layer.weight.dtype})
        return out

    monkeypatch.setattr(TL, "enable_fp8_base", spy)
    assert _train(model, json_data, tmp_path / "fp8", "--max_train_steps", "3", "--fp8_base") == 0
    assert seen == [{torch.float8_e4m3fn}]
    fp8 = load_file(tmp_path / "fp8" / "checkpoint-final.safetensors")
    assert fp8.keys() == eager.keys()
    diffs = [float((fp8[k] - eager[k]).norm() / eager[k].norm()) for k in eager if "lora_B" in k]
    assert 0 < max(diffs) < 0.5, diffs  # fp8 storage changed the run, and it still trained the same LoRA roughly
