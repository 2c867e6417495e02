"""Training: the loss and LoRA gradients of a fused model equal stock diffusers + peft; end-to-end runs of
`qwen-fused train` (CSV, JSON with two edit images, resume, cache, fp8 base, --lora_fused, DDP) and bad input."""
import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_close, free_port

import qwen_fused
from qwen_fused import data as D
from qwen_fused import encode as E
from qwen_fused import flow as F
from qwen_fused import train as T
from qwen_fused import train_lora as L
from qwen_fused import train_state as S
from qwen_fused.demo import make_demo_dataset
from qwen_fused.names import STREAMS
from qwen_fused.numerics import rel_err
from qwen_fused.pipeline import load_pipeline
from qwen_fused.tiny import random_transformer, save_tiny_pipeline

TARGETS = L.lora_targets(L.DEFAULT_TARGETS)
NON_QKV = [t for t in TARGETS if t not in STREAMS]


def synthetic_batch(seed=0, batch=2, edits=((6, 8),), target=(8, 6), txt=7, masked=True):
    g = torch.Generator().manual_seed(seed)
    b = {"target": torch.randn(batch, 4, 1, *target, generator=g),
         "edits": [torch.randn(batch, 4, 1, *e, generator=g) for e in edits],
         "prompt_embeds": torch.randn(batch, txt, 16, generator=g), "prompt_embeds_mask": None}
    if masked:
        mask = torch.ones(batch, txt, dtype=torch.long)
        mask[-1, txt // 2:] = 0
        b["prompt_embeds_mask"] = mask
    return b


def paired_models(zero_cond_t=False, targets=TARGETS, seed=0):
    """A stock transformer with peft LoRA and a fused copy whose merged LoRA is the same model:
    merged A = the shared A of q, k, v; merged B = cat(B_q, B_k, B_v). Random B so every gradient is non-zero."""
    stock = random_transformer(seed, zero_cond_t=zero_cond_t)
    fused = copy.deepcopy(stock)
    qwen_fused.fuse_qkv(fused)
    for m in (stock, fused):
        m.requires_grad_(False)
    L.add_training_lora(fused, 4, 8.0, targets)
    L.add_training_lora(stock, 4, 8.0, L.stock_targets(targets))
    g = torch.Generator().manual_seed(seed + 1)
    fsd = S.lora_state(fused)
    fsd = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in fsd.items()}
    S.set_lora_state(fused, fsd)
    S.set_lora_state(stock, to_stock_state(fsd))
    return stock, fused


def to_stock_state(fsd):
    out = {}
    for k, v in fsd.items():
        module, leaf = k.split(".lora_")
        parent, name = module.rsplit(".", 1)
        if name not in STREAMS:
            out[k] = v
            continue
        for i, part in enumerate(STREAMS[name]):
            key = f"{parent}.{part}.lora_{leaf}"
            out[key] = v if leaf.startswith("A") else v.chunk(3, dim=0)[i]
    return out


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def fused_grad_from_stock(sg, fused_name):
    """The merged LoRA's gradient implied by the stock one: dA = sum of the parts' dA, dB = cat of dB."""
    module, leaf = fused_name.split(".lora_")
    parent, name = module.rsplit(".", 1)
    if name not in STREAMS:
        return sg[fused_name]
    parts = [sg[f"{parent}.{p}.lora_{leaf}"] for p in STREAMS[name]]
    return sum(parts) if leaf.startswith("A") else torch.cat(parts)


@pytest.mark.parametrize("zero_cond_t,edits", [(False, ((6, 8),)), (True, ((6, 8), (4, 4)))],
                         ids=["edit-1img", "2511-2img"])
def test_step_matches_stock(zero_cond_t, edits):
    stock, fused = paired_models(zero_cond_t)
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler(), weighting_scheme="cosmap")
    batch = synthetic_batch(edits=edits)
    torch.manual_seed(5)
    loss_f, d = flow.loss(fused, batch)
    loss_s, _ = flow.loss(stock, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
    loss_f.backward()
    loss_s.backward()
    print(f"loss fused {loss_f.item():.6f} stock {loss_s.item():.6f}")
    assert_close(loss_f.detach(), loss_s.detach(), 1e-5, "loss")
    sg, fg = grads(stock), grads(fused)
    assert len(fg) == 2 * (len(TARGETS) * 2 - 2)  # A and B per target per block, less the last block's text out
    worst = 0.0
    for name, g in fg.items():
        assert g is not None and g.abs().max() > 0, name
        worst = max(worst, assert_close(g, fused_grad_from_stock(sg, name), 1e-5, name))
    print(f"worst LoRA grad rel err {worst:.2e}")


def test_gradient_checkpointing_same_step():
    _, fused = paired_models(zero_cond_t=True)
    ckpt = copy.deepcopy(fused)
    ckpt.enable_gradient_checkpointing()
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler())
    batch = synthetic_batch(edits=((6, 8), (4, 4)))
    torch.manual_seed(2)
    la, d = flow.loss(fused, batch)
    lb, _ = flow.loss(ckpt, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
    la.backward()
    lb.backward()
    assert_close(lb.detach(), la.detach(), 1e-5, "loss")
    ga, gb = grads(fused), grads(ckpt)
    for name in ga:
        assert_close(gb[name], ga[name], 1e-5, name)


def test_steps_match_stock_without_qkv_lora():
    """Several AdamW steps: same losses (LoRA on the other targets, q/k/v through the fused processor)."""
    stock, fused = paired_models(targets=NON_QKV)
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler())
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (fused, stock)]
    for step in range(4):
        batch = synthetic_batch(seed=step)
        lf, d = flow.loss(fused, batch)
        ls, _ = flow.loss(stock, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
        for loss, opt in zip((lf, ls), opts):
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert_close(lf.detach(), ls.detach(), 1e-5, f"loss at step {step}")


def test_loss_decreases_on_fixed_batch():
    _, fused = paired_models()
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler())
    opt = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=3e-3)
    batch = synthetic_batch()
    torch.manual_seed(0)
    _, d = flow.loss(fused, batch)
    losses = []
    for _ in range(8):
        loss, _ = flow.loss(fused, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print("losses", [round(x, 4) for x in losses])
    assert all(map(lambda x: torch.isfinite(torch.tensor(x)), losses))
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < losses[-2]


def test_fp8_base_matches_stock_layerwise_casting():
    """fp8 storage: the fused processor gets the same upcast weights as stock diffusers' layerwise casting."""
    stock = random_transformer(0)
    fused = copy.deepcopy(stock)
    qwen_fused.fuse_qkv(fused)
    reference = copy.deepcopy(stock)
    for m in (stock, fused):
        m.requires_grad_(False)
    L.add_training_lora(fused, 4, 4, TARGETS)
    L.add_training_lora(stock, 4, 4, L.stock_targets(TARGETS))
    stock.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    L.enable_fp8_base(fused, torch.float32)
    assert fused.transformer_blocks[0].attn.to_qkv.base_layer.weight.dtype == torch.float8_e4m3fn
    batch = synthetic_batch()
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler())
    torch.manual_seed(1)
    lf, d = flow.loss(fused, batch)
    ls, _ = flow.loss(stock, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
    lr, _ = flow.loss(reference, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
    err = assert_close(lf.detach(), ls.detach(), 1e-5, "fp8 loss fused vs stock")
    print(f"fp8 loss rel err {err:.2e}; fp8 vs full precision {rel_err(lf.detach(), lr.detach())[0]:.2e}")
    assert rel_err(lf.detach(), lr.detach())[0] > 1e-4  # the fp8 storage really took effect
    lf.backward()
    assert fused.transformer_blocks[0].attn.to_qkv.base_layer.weight.dtype == torch.float8_e4m3fn
    assert fused.transformer_blocks[0].attn.to_qkv.lora_B["default"].weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------
# end-to-end runs on the tiny pipeline

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for variant in ("edit", "2511"):
        paths[variant] = str(root / variant)
        save_tiny_pipeline(paths[variant], seed=0, variant=variant)
    return paths


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("csvdata")
    return str(folder), make_demo_dataset(str(folder), n=2, edits=1)


@pytest.fixture(scope="module")
def json_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsondata")
    return str(folder), make_demo_dataset(str(folder), n=2, edits=2)


def run_train(model, data, out, *extra):
    argv = ["--pretrained_model_name_or_path", model, "--dataset_base_path", data[0], "--dataset_metadata_path",
            data[1], "--output_dir", str(out), "--max_pixels", "4096", "--lora_rank", "4", "--max_train_steps", "4",
            "--save_steps", "2", "--learning_rate", "1e-3", *extra]
    return T.main(argv)


def _trained_output(path_merged, path_standard, model_path):
    """Model output with the saved merged LoRA on the fused model, and with the standard one on stock diffusers."""
    from diffusers import QwenImageTransformer2DModel

    base = QwenImageTransformer2DModel.from_pretrained(model_path, subfolder="transformer")
    fused = copy.deepcopy(base)
    qwen_fused.fuse_qkv(fused)
    qwen_fused.load_lora(fused, path_merged)
    sd = load_file(path_standard)
    assert any(".to_q." in k for k in sd) and not any("to_qkv" in k for k in sd)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_path)  # stock diffusers, no qwen_fused involved
    pipe.load_lora_weights(str(path_standard))
    return fused, pipe.transformer, base


def test_train_csv_end_to_end(tiny_models, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    image = os.path.join(csv_data[0], "images", "0_edit0.png")
    assert run_train(tiny_models["edit"], csv_data, out, "--lora_alpha", "8",  # scale 2: alpha must travel
                     "--report_to", "tensorboard", "--validation_image", image, "--validation_prompt", "redder",
                     "--validation_steps", "4", "--validation_inference_steps", "1") == 0
    assert os.path.isfile(out / "validation" / "step-4.png")
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(out / "logs") for f in fs)
    files = sorted(os.listdir(out))
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-final"):
        assert f"{name}.safetensors" in files and f"{name}-merged.safetensors" in files
    assert os.path.isfile(out / "state" / "checkpoint-4" / "lora.safetensors")
    assert "run.json" in files
    # saved LoRAs (merged on fused, standard on stock diffusers) reproduce the trained model
    fused, stock, base = _trained_output(out / "checkpoint-final-merged.safetensors",
                                         out / "checkpoint-final.safetensors", tiny_models["edit"])
    trained = copy.deepcopy(base)
    qwen_fused.fuse_qkv(trained)
    L.add_training_lora(trained, 4, 8.0, TARGETS)
    S.set_lora_state(trained, load_file(out / "state" / "checkpoint-4" / "lora.safetensors"))
    batch = synthetic_batch()
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler())
    with torch.no_grad():
        torch.manual_seed(0)
        lt, d = flow.loss(trained, batch)
        kw = dict(noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
        lb = flow.loss(base, batch, **kw)[0]
        for name, m in (("merged file on fused", fused), ("standard file on stock", stock)):
            assert_close(flow.loss(m, batch, **kw)[0], lt, 1e-5, name)
    assert rel_err(lt, lb)[0] > 1e-6  # training changed the model


def test_compiled_training_matches_eager(tiny_models, csv_data, tmp_path, capsys):
    """`train --compile` on this CPU (inductor), with gradient checkpointing: the same LoRA after two steps as
    eager (same losses, same gradients), and the first step's compile time is logged."""
    runs = {}
    for mode in ("--no-compile", "--compile"):
        out = tmp_path / mode.strip("-")
        assert run_train(tiny_models["edit"], csv_data, out, "--max_train_steps", "2", "--use_gradient_checkpointing",
                         mode) == 0
        runs[mode] = load_file(out / "checkpoint-final.safetensors")
    assert "first step" in capsys.readouterr().out
    eager, compiled = runs["--no-compile"], runs["--compile"]
    assert eager.keys() == compiled.keys()
    for k in eager:
        assert_close(compiled[k], eager[k], 1e-4, k)


def test_train_json_two_edit_images_2511_cache(tiny_models, json_data, tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert run_train(tiny_models["2511"], json_data, out, "--cache", str(cache), "--train_batch_size", "2",
                     "--gradient_accumulation_steps", "2", "--use_gradient_checkpointing", "--dataset_repeat", "2",
                     "--lr_scheduler", "linear") == 0
    assert "0 samples reused, 2 encoded" in capsys.readouterr().out
    # 2 batches per epoch, accumulated 2 at a time: 4 optimizer and lr-schedule steps from 8 batches
    state = out / "state" / "checkpoint-4"
    optimizer = torch.load(state / "optimizer.bin", weights_only=False)
    assert {float(v["step"]) for v in optimizer["state"].values()} == {4.0}
    assert torch.load(state / "scheduler.bin", weights_only=False)["last_epoch"] == 4
    sample = load_file(next(cache.iterdir()))
    assert {"prompt_embeds", "target", "edit.0", "edit.1"} <= set(sample)
    assert run_train(tiny_models["2511"], json_data, tmp_path / "run2", "--cache", str(cache)) == 0
    assert "2 samples reused, 0 encoded" in capsys.readouterr().out
    # a changed image is encoded again
    img = os.path.join(json_data[0], "images", "0_target.png")
    from PIL import Image

    Image.open(img).transpose(Image.FLIP_LEFT_RIGHT).save(img)
    assert run_train(tiny_models["2511"], json_data, tmp_path / "run3", "--cache", str(cache)) == 0
    assert "1 samples reused, 1 encoded" in capsys.readouterr().out


def test_resume_matches_uninterrupted(tiny_models, csv_data, tmp_path):
    """4 batches per epoch whose sample order differs between epochs 0 and 1: resuming at the epoch boundary
    (step 4) must use epoch 1's order, resuming mid-epoch (step 5) must skip the batch already seen."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ("--dataset_repeat", "2", "--save_steps", "100")
    assert run_train(tiny_models["edit"], csv_data, full, "--max_train_steps", "6", *common) == 0
    assert run_train(tiny_models["edit"], csv_data, part, "--max_train_steps", "4", *common) == 0
    for steps in ("5", "6"):
        assert run_train(tiny_models["edit"], csv_data, part, "--max_train_steps", steps, *common,
                         "--resume_from_checkpoint", "latest") == 0
    assert sorted(os.listdir(part / "state")) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    a, b = load_file(full / "checkpoint-final.safetensors"), load_file(part / "checkpoint-final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], 1e-6, k)
    # and it did train past the resume point
    c = load_file(part / "checkpoint-4.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sigterm_saves_resumable_state(tiny_models, csv_data, tmp_path, monkeypatch):
    calls = {"n": 0}
    loss = F.FlowMatching.loss

    def loss_then_term(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *a, **k)

    monkeypatch.setattr(F.FlowMatching, "loss", loss_then_term)
    out = tmp_path / "run"
    assert run_train(tiny_models["edit"], csv_data, out, "--max_train_steps", "50", "--save_steps", "100") == 143
    assert os.path.isfile(out / "state" / "checkpoint-3" / "train_state.json")
    assert not os.path.exists(out / "checkpoint-final.safetensors")
    monkeypatch.setattr(F.FlowMatching, "loss", loss)
    assert run_train(tiny_models["edit"], csv_data, out, "--max_train_steps", "4", "--save_steps", "100",
                     "--resume_from_checkpoint", "latest") == 0
    assert os.path.isfile(out / "checkpoint-final.safetensors")


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_models, csv_data, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    loss = F.FlowMatching.loss

    def nan_at_3(self, *a, **k):
        calls["n"] += 1
        value, d = loss(self, *a, **k)
        return (value * float("nan") if calls["n"] == 3 else value), d

    monkeypatch.setattr(F.FlowMatching, "loss", nan_at_3)
    out = tmp_path / "run"
    assert run_train(tiny_models["edit"], csv_data, out) == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 3" in err and "checkpoint-2" in err
    assert os.path.isfile(out / "checkpoint-2.safetensors")
    assert os.path.isfile(out / "state" / "checkpoint-2" / "lora.safetensors")
    assert not os.path.exists(out / "checkpoint-final.safetensors")


def test_lora_fused_applies_every_part(tiny_models, tmp_path):
    """A Lightning-style LoRA (lora_down/up/alpha, standard q/k/v names) fused into the merged base before
    training: the fused model equals stock diffusers + that LoRA."""
    from diffusers import QwenImageTransformer2DModel

    base = QwenImageTransformer2DModel.from_pretrained(tiny_models["edit"], subfolder="transformer")
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, mod in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("transformer_blocks.") and isinstance(mod, torch.nn.Linear) and (
                leaf in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
                or name.endswith(("to_out.0", "img_mlp.net.2", "txt_mod.1"))):
            sd[f"{name}.lora_down.weight"] = torch.randn(2, mod.in_features, generator=g) * 0.3
            sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_features, 2, generator=g) * 0.3
            sd[f"{name}.alpha"] = torch.tensor(1.0)
    path = str(tmp_path / "lightning.safetensors")
    save_file(sd, path)
    args = T.add_arguments(__import__("argparse").ArgumentParser()).parse_args(["--lora_rank", "2"])
    pipe = load_pipeline(tiny_models["edit"])
    model = L.prepare_transformer(pipe, args, TARGETS, [(path, 0.7)])
    # the stock reference: diffusers' own loader for the same file (kohya-like keys -> peft), scale 0.7
    stock = copy.deepcopy(base)
    peft_sd = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in sd.items()
               if not k.endswith("alpha")}
    stock.load_lora_adapter(peft_sd, prefix=None, adapter_name="light",
                            metadata={"r": 2, "lora_alpha": 1.0,
                                      "target_modules": sorted({k.rsplit(".lora", 1)[0] for k in peft_sd})})
    stock.set_adapters(["light"], [0.7])
    batch = synthetic_batch()
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler())
    with torch.no_grad():
        torch.manual_seed(0)
        lm, d = flow.loss(model, batch)  # the fresh training LoRA has B = 0: the model is base + Lightning
        kw = dict(noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])
        ls = flow.loss(stock, batch, **kw)[0]
        lb = flow.loss(base, batch, **kw)[0]
    err = assert_close(lm, ls, 1e-5, "fused Lightning vs stock + Lightning")
    print(f"--lora_fused loss rel err {err:.2e}; effect of the LoRA {rel_err(lm, lb)[0]:.2e}")
    assert rel_err(lm, lb)[0] > 1e-4
    blk = model.transformer_blocks[0].attn.to_qkv.base_layer.weight
    assert not torch.equal(blk[32:64], torch.cat([base.transformer_blocks[0].attn.to_k.weight]))  # k slice changed


# ----------------------------------------------------------------------------------------------------------
# bad input: a clear message before any compute

def _meta(folder, rows, name="meta.csv", columns=("image", "edit_image", "prompt")):
    path = os.path.join(folder, name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("case,needle", [
    ("missing_column", "missing column(s) prompt"),
    ("empty_prompt", "empty prompt"),
    ("missing_image", "does not exist"),
    ("unreadable_image", "cannot read image"),
    ("no_base", "does not exist or is not a folder"),
    ("no_meta", "metadata file"),
    ("bad_json", "cannot read metadata"),
    ("other_run", "holds another run"),
    ("bad_lora", "--lora_fused"),
    ("bad_scale", "bad scale 'abc' in --lora_fused "),
])
def test_bad_input(case, needle, tiny_models, csv_data, tmp_path, capsys):
    base, meta = csv_data
    out = tmp_path / "out"
    extra = []
    rows = [{"image": "images/0_target.png", "edit_image": "images/0_edit0.png", "prompt": "x"}]
    if case == "missing_column":
        meta = _meta(base, [{"image": r["image"], "edit_image": r["edit_image"]} for r in rows], "m1.csv",
                     ("image", "edit_image"))
    elif case == "empty_prompt":
        meta = _meta(base, [dict(rows[0], prompt="  ")], "m2.csv")
    elif case == "missing_image":
        meta = _meta(base, [dict(rows[0], edit_image="images/nope.png")], "m3.csv")
    elif case == "unreadable_image":
        with open(os.path.join(base, "images", "broken.png"), "w") as f:
            f.write("not a png")
        meta = _meta(base, [dict(rows[0], image="images/broken.png")], "m4.csv")
    elif case == "no_base":
        base = str(tmp_path / "nowhere")
    elif case == "no_meta":
        meta = str(tmp_path / "nothing.csv")
    elif case == "bad_json":
        meta = os.path.join(base, "bad.json")
        with open(meta, "w") as f:
            f.write("{not json")
    elif case == "other_run":
        out.mkdir()
        (out / "run.json").write_text("{}")
    elif case == "bad_lora":
        extra = ["--lora_fused", str(tmp_path / "missing.safetensors:0.5")]
    elif case == "bad_scale":  # an existing file and a scale that is not a number
        extra = ["--lora_fused", f"{meta}:abc"]
    code = run_train(tiny_models["edit"], (base, meta), out, *extra)
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not os.path.exists(out / "state")


def test_lora_that_does_not_fit(tiny_models, csv_data, tmp_path, capsys):
    bad = str(tmp_path / "big.safetensors")
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 99),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 2)}, bad)
    assert run_train(tiny_models["edit"], csv_data, tmp_path / "out", "--lora_fused", bad) == 2
    assert "do not fit" in capsys.readouterr().err


class ModelLoaded(Exception):
    """Raised by a patched `load_pipeline`: the run got past its input checks."""


@pytest.fixture
def no_model_load(monkeypatch):
    def load(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(T, "load_pipeline", load)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_report_to_without_package(tracker, tiny_models, csv_data, tmp_path, monkeypatch, no_model_load, capsys):
    """A tracker whose package is missing: accelerate only warns and trains without logs; this must be an error
    before any model loads. The package is made unavailable where accelerate looks for it."""
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    out = tmp_path / "out"
    assert run_train(tiny_models["edit"], csv_data, out, "--report_to", tracker) == 2
    err = capsys.readouterr().err
    assert f"qwen-fused train: error: --report_to {tracker}" in err and f"pip install {tracker}" in err, err
    if tracker == "tensorboard":
        assert "qwen-fused[train]" in err
    assert not os.path.exists(out)


@pytest.fixture(scope="module")
def trained_run(tiny_models, csv_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run_train(tiny_models["edit"], csv_data, out, "--max_train_steps", "2") == 0
    return out


@pytest.mark.parametrize("extra,needle", [
    (["--lora_rank", "8"], "--lora_rank 8 (checkpoint: 4)"),
    (["--lora_alpha", "2"], "--lora_alpha 2.0 (checkpoint: 4.0)"),
    (["--lora_target_modules", "to_qkv"], "--lora_target_modules to_qkv (checkpoint: "),
    (["--no_fuse"], "--no_fuse True (checkpoint: False)"),
    (["--lora_alpha", "4", "--lora_target_modules", ", ".join(reversed(L.DEFAULT_TARGETS.split(","))) + ",to_qkv"],
     None),
], ids=["rank", "alpha", "targets", "no_fuse", "same_model"])
def test_resume_with_other_settings(extra, needle, trained_run, tiny_models, csv_data, tmp_path, no_model_load,
                                    capsys):
    """Settings that shape the model or its LoRA must match the checkpoint's run (its run.json): a clear error
    before any model loads, naming each difference. The same model spelled differently (alpha = the rank, the
    targets in another order) resumes."""
    out = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run, out)
    resume = ["--resume_from_checkpoint", "latest", *extra]
    if needle is None:
        with pytest.raises(ModelLoaded):
            run_train(tiny_models["edit"], csv_data, out, *resume)
        return
    assert run_train(tiny_models["edit"], csv_data, out, *resume) == 2
    err = capsys.readouterr().err
    assert "qwen-fused train: error: --resume_from_checkpoint" in err and needle in err, err


def test_encoding_progress_reaches_total(tiny_models, csv_data, monkeypatch):
    """The "encoding samples" bar ends at n/n (it stopped at n-1 when zip() stopped before its last step)."""
    import argparse

    import tqdm.auto
    from accelerate import Accelerator

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    records = D.read_metadata(*csv_data)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

    args = argparse.Namespace(max_pixels=4096, condition_area=CONDITION_IMAGE_SIZE, cache=None, dataset_repeat=1)
    E.build_dataset(args, load_pipeline(tiny_models["edit"]), Accelerator(cpu=True), records)
    assert [(b.n, b.total) for b in bars if b.desc == "encoding samples"] == [(2, 2)]


def _unfit_lora(path):
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 99),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(48, 2)}, path)
    return path


@pytest.mark.parametrize("case,needle", [
    ("corrupt_image", "cannot read image"),
    ("bad_target", "not in this transformer"),
    ("bad_lora_fused", "do not fit"),
    ("users_folder", "not in this transformer"),
])
def test_failed_start_leaves_no_output_dir(case, needle, tiny_models, csv_data, tmp_path, capsys):
    """A run that fails after making its output folder but before training removes that folder again; a folder
    that was there before (here holding a file of the user's) is kept as it was."""
    base, meta = csv_data
    out = tmp_path / "out"
    extra = []
    if case == "corrupt_image":
        data = tmp_path / "data"
        (data / "images").mkdir(parents=True)
        (data / "images" / "broken.png").write_bytes(b"\x89PNG not really")
        (data / "images" / "ok.png").write_bytes(open(os.path.join(base, "images", "0_edit0.png"), "rb").read())
        base, meta = str(data), _meta(str(data), [{"image": "images/broken.png", "edit_image": "images/ok.png",
                                                   "prompt": "x"}])
    elif case in ("bad_target", "users_folder"):
        extra = ["--lora_target_modules", "to_qkv,no_such_module"]
    elif case == "bad_lora_fused":
        extra = ["--lora_fused", _unfit_lora(str(tmp_path / "big.safetensors"))]
    if case == "users_folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    assert run_train(tiny_models["edit"], (base, meta), out, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    if case == "users_folder":
        assert sorted(os.listdir(out)) == ["notes.txt"]
    else:
        assert not os.path.exists(out), os.listdir(out)


@pytest.mark.parametrize("argv,missing", [
    ([], ["--pretrained_model_name_or_path", "--dataset_base_path", "--dataset_metadata_path", "--output_dir"]),
    (["--pretrained_model_name_or_path", "m", "--dataset_base_path", "d", "--dataset_metadata_path", "d/m.csv"],
     ["--output_dir"]),
], ids=["no_arguments", "no_output_dir"])
def test_missing_required_arguments(argv, missing, capsys):
    from qwen_fused.cli import main

    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert f"qwen-fused train: error: the following arguments are required: {', '.join(missing)}" in err, err


def subcommand_parser(name):
    import argparse

    from qwen_fused.cli import build_parser

    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices[name]


def assert_every_flag_has_help(parser):
    bare = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions if not a.help]
    assert not bare, f"{parser.prog}: no help for {', '.join(bare)}"


def help_entries(parser):
    """`--help` as {first option string: its entry, wrapped lines joined}."""
    text = parser.format_help()
    for shown in ("None", "False", "True"):  # "not given" and a switch's off state are no defaults to show
        assert f"(default: {shown})" not in text, shown
    entries, key = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            key = line.split()[0].rstrip(",")
            entries[key] = line.strip()
        elif key and line.startswith("    "):
            entries[key] += " " + line.strip()
        else:
            key = None
    return entries


def test_help_shows_defaults_and_every_flag_has_help():
    top, train = subcommand_parser("train")
    assert_every_flag_has_help(top)
    assert_every_flag_has_help(train)
    lines = help_entries(train)
    for flag, default in (("--learning_rate", "0.0001"), ("--lora_rank", "32"), ("--save_steps", "500"),
                          ("--num_epochs", "1"), ("--seed", "0")):
        assert f"(default: {default})" in lines[flag], lines[flag]
    assert "Output folder:\n" in train.format_help()  # the docstring's own layout is kept
    # the overview speaks about what a user does, not about the package's modules
    for task in ("train a LoRA", "edit images", "check", "convert", "benchmark"):
        assert task in top.description, task
    assert "module" not in top.description


def test_fit_size_and_buckets():
    assert D.fit_size(4000, 3000, 1048576) == (1152, 864)
    w, h = D.fit_size(4000, 3000, 1048576)
    assert w * h <= 1048576 and w % 32 == 0 and h % 32 == 0
    assert D.fit_size(100, 50, 1048576) == (96, 32)  # never upscaled
    assert D.area_size(1024, 1024, 384 * 384) == (384, 384)


def test_metadata_json_and_jsonl(json_data, tmp_path):
    base, meta = json_data
    recs = D.read_metadata(base, meta)
    assert len(recs) == 2 and all(len(r.edit_images) == 2 for r in recs)
    jl = tmp_path / "m.jsonl"
    rows = json.load(open(meta))
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r.image for r in D.read_metadata(base, jl)] == [r.image for r in recs]
    rows[1]["edit_image"] = rows[1]["edit_image"][:1]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    with pytest.raises(D.DataError, match="different numbers of edit images"):
        D.read_metadata(base, tmp_path / "mixed.json")


def test_bucketing_groups_sizes():
    items = [{"i": i} for i in range(7)]
    buckets = [(64, 32), (32, 32), (64, 32), (32, 32), (64, 32), (96, 32), (64, 32)]
    ds = D.EncodedDataset(items, buckets, repeat=2)
    sampler = D.BucketBatchSampler(ds, 3, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(14))
    for b in batches:
        assert len({ds.bucket(i) for i in b}) == 1 and len(b) <= 3
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_bucket_batches_stay_whole_when_sharded():
    """Under several processes accelerate wraps the batch sampler in `BatchSamplerShard`: every process must get
    same-bucket batches only, the same number of them, and every sample must be used."""
    from accelerate.data_loader import BatchSamplerShard

    buckets = [(64, 32)] * 5 + [(32, 32)] * 3 + [(96, 32)] * 2
    ds = D.EncodedDataset([{"i": i} for i in range(10)], buckets)
    sampler = D.BucketBatchSampler(ds, 2, seed=0)
    assert any(len(b) < 2 for b in list(sampler)[:-1])  # a short batch before the end: the case that broke
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        shards = [list(BatchSamplerShard(sampler, 2, rank)) for rank in range(2)]
        assert len(shards[0]) == len(shards[1])
        for b in shards[0] + shards[1]:
            assert len({ds.bucket(i) for i in b}) == 1, b
        assert sorted({i for sh in shards for b in sh for i in b}) == list(range(10))


def test_timesteps_match_diffusers_script():
    """The (timestep, sigma) pairs are those of diffusers' train_dreambooth_lora_qwen_image.py: index into the
    scheduler's table as constructed, sigma looked up by timestep. Qwen-Image's scheduler has use_dynamic_shifting,
    so that table is unshifted (the resolution-dependent `mu` shift applies to inference only); a static `shift`
    is applied."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    qwen = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    for config, shifted in ((qwen, False), (dict(shift=3.0), True)):
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        scheduler.set_timesteps(4, mu=0.7 if config.get("use_dynamic_shifting") else None)  # must not matter
        flow = F.FlowMatching(scheduler, weighting_scheme="logit_normal")
        torch.manual_seed(0)
        t, s = flow.sample(64, "cpu")
        ref = FlowMatchEulerDiscreteScheduler(**config)
        torch.manual_seed(0)
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling("logit_normal", 64, 0.0, 1.0, 1.29)
        t_ref = ref.timesteps[(u * ref.config.num_train_timesteps).long()]
        s_ref = ref.sigmas[[(ref.timesteps == x).nonzero().item() for x in t_ref]]
        assert torch.equal(t, t_ref) and torch.equal(s, s_ref)
        assert torch.allclose(s, t / 1000)  # the transformer gets timestep / 1000 = sigma
        uniform = torch.arange(1000, 0, -1) / 1000
        assert torch.allclose(flow.sigmas, uniform) != shifted


def test_encoded_latents_are_the_pipelines(csv_data):
    """encode_sample's condition latents are exactly what the stock edit pipeline packs into the image stream
    (VAE mode, then (z - latents_mean) / latents_std), checked with a non-trivial mean / std."""
    from qwen_fused.tiny import tiny_edit_pipeline

    pipe = tiny_edit_pipeline(variant="edit")
    pipe.vae.register_to_config(latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[2.0, 0.5, 1.5, 3.0])
    record = D.read_metadata(*csv_data)[0]
    plan = D.plan_sample(record, 64 * 64, None)
    sample = E.encode_sample(pipe, record, plan, "cpu")
    w, h = plan.edits[0]
    pixels = pipe.image_processor.preprocess(D.open_rgb(record.edit_images[0]), h, w).unsqueeze(2)
    _, image_latents = pipe.prepare_latents(pixels, 1, 4, h, w, torch.float32, "cpu", None)
    assert torch.equal(F.pack(sample["edits"][0][None]), image_latents)
    w, h = plan.target
    pixels = pipe.image_processor.preprocess(D.open_rgb(record.image), h, w).unsqueeze(2)
    raw = pipe.vae.encode(pixels).latent_dist.mode()
    mean, std = (torch.tensor(v).view(1, 4, 1, 1, 1) for v in ([0.3, -0.2, 0.1, 0.5], [2.0, 0.5, 1.5, 3.0]))
    assert torch.allclose(sample["target"][None], (raw - mean) / std, atol=1e-6)


def test_cache_key_follows_model_files(tmp_path):
    """New encoder weights saved into the same model folder must not reuse samples encoded with the old ones."""
    import argparse

    path = tmp_path / "m"
    pipe = save_tiny_pipeline(path, seed=0)
    args = argparse.Namespace(pretrained_model_name_or_path=str(path))
    key = E.model_key(args, pipe)
    assert E.model_key(args, pipe) == key
    pipe.vae.save_pretrained(path / "vae")  # same class, dtype and path; rewritten files
    assert E.model_key(args, pipe) != key


def test_demo_cli(tmp_path):
    from qwen_fused.cli import main

    assert main(["train", "--demo", "--output_dir", str(tmp_path / "demo"), "--max_train_steps", "3"]) == 0
    assert os.path.isfile(tmp_path / "demo" / "checkpoint-final.safetensors")


def test_demo_leaves_nothing_in_temp(tmp_path):
    """The demo's tiny model and data (~36 MB) go when the command ends; the output folder asked for stays."""
    temp, out = tmp_path / "temp", tmp_path / "out"
    temp.mkdir()
    res = subprocess.run([sys.executable, "-m", "qwen_fused.cli", "train", "--demo", "--output_dir", str(out),
                          "--max_train_steps", "1"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TMPDIR=str(temp)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert str(temp) in res.stdout  # the demo did use this temp folder
    assert os.path.isfile(out / "checkpoint-final.safetensors")
    assert not list(temp.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["edit", "2.1"])
def test_ddp_two_cpu_processes(tmp_path, variant):
    """DDP with 2 CPU processes (gloo). `accelerate launch --cpu` starts a single process without MPI, so the
    processes come from torchrun; accelerate picks MULTI_CPU from its environment."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           free_port(), "-m", "qwen_fused.train", "--demo", "--demo_variant", variant,
           "--output_dir", str(out), "--max_train_steps", "3", "--save_steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, ACCELERATE_USE_CPU="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(out / "checkpoint-final.safetensors")
    assert sorted(f for f in os.listdir(out / "state" / "checkpoint-2") if f.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert res.stdout.count("demo: tiny model") == 1


def synthetic_batch21(seed=0, batch=2, edit=(4, 4), target=(4, 6), text=(3, 2), channels=8, width=16):
    """A `FlowMatching21` batch for `families.tiny21.random_transformer` (8 latent channels, text width 16): the text
    stream is `text[0]` tokens, the condition image's slots (one per 2x2 latent tokens), `text[1]` tokens; the last
    sample's last text token is padding."""
    g = torch.Generator().manual_seed(seed)
    slots = edit[0] * edit[1] // 4
    row = [False] * text[0] + [True] * slots + [False] * text[1]
    mask = torch.ones(batch, len(row), dtype=torch.long)
    mask[-1, -1] = 0
    return {"target": torch.randn(batch, channels, 1, *target, generator=g),
            "edits": [torch.randn(batch, channels, 1, *edit, generator=g)],
            "prompt_embeds": torch.randn(batch, len(row), width, generator=g), "prompt_embeds_mask": mask,
            "img_mask": torch.tensor([row] * batch)}


FSDP2_SCRIPT = """
import copy, sys, torch, torch.distributed as dist, qwen_fused
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from diffusers import FlowMatchEulerDiscreteScheduler
sys.path.insert(0, sys.argv[1])
from qwen_fused.numerics import rel_err as rel
from test_train import TARGETS, F, L, S, synthetic_batch, synthetic_batch21, random_transformer
dist.init_process_group("gloo")
if sys.argv[3] == "2.1":
    from qwen_fused.families import qwenimage21, tiny21
    from qwen_fused.families.qwenimage21_train import FlowMatching21
    m, targets, batch = tiny21.random_transformer(0), list(qwenimage21.LORA_TARGETS), synthetic_batch21()
    flow = FlowMatching21(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=4096,
                                                          time_shift_type="exponential"))
else:
    m, targets, batch = random_transformer(0), TARGETS, synthetic_batch()
    flow = F.FlowMatching(FlowMatchEulerDiscreteScheduler())
qwen_fused.fuse_qkv(m); m.requires_grad_(False)
torch.manual_seed(0)  # the same LoRA init on every process, so that the unsharded copy is the sharded model
L.add_training_lora(m, 4, 4, targets)
torch.manual_seed(0)
for n, p in m.named_parameters():
    if "lora_B" in n: p.data.normal_(0, 0.1)
ref = copy.deepcopy(m)
if sys.argv[2] == "compile":  # as `train --compile` does: compiled before accelerate shards the model
    m.compile_repeated_blocks(fullgraph=True)
for block in m.transformer_blocks: fully_shard(block)
fully_shard(m)
w = m.transformer_blocks[0].attn.to_qkv.base_layer.weight
assert w.to_local().shape[0] == w.shape[0] // 2, w.to_local().shape
torch.manual_seed(1)
loss, d = flow.loss(m, batch); loss.backward()
loss_ref = flow.loss(ref, batch, noise=d["noise"], timesteps=d["timesteps"], sigmas=d["sigmas"])[0]; loss_ref.backward()
assert rel(loss.detach(), loss_ref.detach())[0] < 1e-6
n_grads = 0
for (n, p), (nr, q) in zip(m.named_parameters(), ref.named_parameters()):
    assert n.replace("._orig_mod", "") == nr, (n, nr)
    if p.requires_grad:
        assert q.grad is not None and q.grad.abs().max() > 0, n  # every LoRA factor is trained
        assert rel(p.grad.full_tensor(), q.grad)[0] < 1e-5, n
        n_grads += 1
assert n_grads == sum(q.requires_grad for q in ref.parameters()) >= 2 * len(targets), n_grads
lora = S.lora_state(m, with_alpha=True)  # gathers the shards on every process
ref_lora = S.lora_state(ref, with_alpha=True)
assert lora.keys() == ref_lora.keys() and all(torch.equal(lora[k], v) for k, v in ref_lora.items())
sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    assert torch.equal(sd["transformer_blocks.0.attn.to_qkv.base_layer.weight"],
                       ref.transformer_blocks[0].attn.to_qkv.base_layer.weight)
    print("FSDP2 OK")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["edit", "2.1"])
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_fsdp2_fused_blocks(tmp_path, mode, family):
    """torch FSDP2 (`fully_shard` per block, as qwen_fused/fsdp_config.yaml asks accelerate for), 2 CPU processes,
    a fused LoRA model of each family (Qwen-Image's loss, or 2.1's `FlowMatching21` batch): the merged projections
    shard by rows; loss, every LoRA gradient and the gathered LoRA / full state dict equal the unsharded model,
    eager and with the blocks compiled (fullgraph, inductor) before sharding."""
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(script), os.path.dirname(__file__), mode, family]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "FSDP2 OK" in res.stdout, res.stderr[-3000:]


FSDP_CONFIG = os.path.join(os.path.dirname(qwen_fused.__file__), "fsdp_config.yaml")


def fsdp_launch_env(config=FSDP_CONFIG):
    """The FSDP environment `accelerate launch --config_file CONFIG` gives each process, by accelerate's own
    parsing (`_validate_launch_command` reads the file into the launch args, `prepare_multi_gpu_env` turns them
    into the FSDP_* variables that `FullyShardedDataParallelPlugin` reads)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", config, "x.py"]))
    assert args.use_fsdp and str(args.fsdp_version) == "2"
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


@pytest.mark.parametrize("family", ["edit", "2.1"])
def test_fsdp_config_wraps_every_block(family, monkeypatch):
    """The shipped config, as accelerate resolves it for a fused LoRA model with compiled blocks (what `train`
    hands to `prepare`): the wrap policy takes every transformer block and no other module, for Qwen-Image and
    Qwen-Image 2.1 alike. `fsdp2_prepare_model` calls these two functions and `fully_shard`s each module the policy
    accepts (besides the root and the final norm, which it shards anyway: see the launch test below). A class name
    in the config fits one family only: accelerate raises for a name the model lacks."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from qwen_fused.families import qwenimage21, tiny21

    env = fsdp_launch_env()
    for k in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if family == "2.1":
        m, targets, block = tiny21.random_transformer(0), list(qwenimage21.LORA_TARGETS), "QwenImage21TransformerBlock"
    else:
        m, targets, block = random_transformer(0), TARGETS, "QwenImageTransformerBlock"
    qwen_fused.fuse_qkv(m)
    m.requires_grad_(False)
    L.add_training_lora(m, 4, 4, targets)
    m.compile_repeated_blocks(fullgraph=True)  # lazy: nothing compiles here
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(m)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, m)
    assert plugin.transformer_cls_names_to_wrap == [block]
    wrapped = [name for name, module in m.named_modules() if name and policy(module)]
    assert wrapped == [f"transformer_blocks.{i}" for i in range(len(m.transformer_blocks))] and len(wrapped) == 2


FSDP_TRAIN_SCRIPT = """
import sys
import accelerate
import accelerate.state as st
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

init = st.AcceleratorState.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):  # where accelerate would take FSDP on GPUs (state.py)
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


prepare = accelerate.Accelerator.prepare


def prepare_and_report(self, *args, **kwargs):
    out = prepare(self, *args, **kwargs)
    units = [n or "<root>" for n, m in out[0].named_modules() if isinstance(m, FSDPModule)]
    self.print(f"distributed {self.distributed_type.value}, FSDP units: {','.join(units)}")
    return out


st.AcceleratorState.__init__ = fsdp_on_cpu
accelerate.Accelerator.prepare = prepare_and_report
from qwen_fused import train  # noqa: E402
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["edit", "2.1"])
def test_fsdp_train_under_shipped_config(tmp_path, variant):
    """`accelerate launch --config_file qwen_fused/fsdp_config.yaml` (as shipped: FSDP2, bf16) of `train` on the demo
    model and data, 2 CPU processes, through accelerate's own FSDP code (prepare, clip, sharded save and load of the
    state). accelerate itself never takes that path on CPU: `AcceleratorState.__init__` (state.py) sets
    DistributedType.FSDP only for accelerator devices (MULTI_GPU, MULTI_XPU, ...) and runs DDP (MULTI_CPU) instead,
    without a word; the script flips MULTI_CPU to FSDP where accelerate would have set it, and changes nothing else.
    The FSDP units are the root, the blocks and the final norm (accelerate's own), 3 steps train, and a resume from
    the step-2 state ends bit for bit where the uninterrupted run does."""
    from qwen_fused.demo import make_demo_dataset, save_demo_pipeline

    script, model, data = tmp_path / "fsdp_train.py", tmp_path / "model", tmp_path / "data"
    script.write_text(FSDP_TRAIN_SCRIPT)
    save_demo_pipeline(str(model), 0, variant)
    make_demo_dataset(str(data), edits=1 if variant == "edit" else 2)
    port = free_port()

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--num_processes", "2",
               "--main_process_port", port, str(script), "--demo", "--demo_variant", variant,
               "--pretrained_model_name_or_path", str(model), "--dataset_base_path", str(data),
               "--dataset_metadata_path", str(data / ("metadata.csv" if variant == "edit" else "metadata.json")),
               "--output_dir", str(out), "--max_train_steps", "3", "--save_steps", "2", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, ACCELERATE_USE_CPU="1"))
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    full, part = tmp_path / "full", tmp_path / "part"
    stdout = launch(full)
    assert "distributed FSDP, FSDP units: <root>,transformer_blocks.0,transformer_blocks.1,norm_out\n" in stdout, stdout
    assert "precision bf16" in stdout and "trained 3 steps" in stdout, stdout
    state = full / "state" / "checkpoint-2"
    assert {"lora.safetensors", "pytorch_model_fsdp_0", "optimizer_0"} <= set(os.listdir(state))
    # the step-2 state alone, as if the run had stopped there
    os.makedirs(part / "state")
    shutil.copytree(state, part / "state" / "checkpoint-2")
    shutil.copy(full / "run.json", part / "run.json")
    assert "resumed from" in launch(part, "--resume_from_checkpoint", "latest")
    a, b = load_file(full / "checkpoint-final.safetensors"), load_file(part / "checkpoint-final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(full / "checkpoint-2.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # step 3 did train


DDP_STOP_SCRIPT = """
import os, signal, sys
from qwen_fused import flow as F, train as T
loss, calls = F.FlowMatching.loss, [0]
def loss_then_term(self, *a, **k):  # SIGTERM reaches rank 0 only, during its second step
    calls[0] += 1
    if os.environ["RANK"] == "0" and calls[0] == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss(self, *a, **k)
F.FlowMatching.loss = loss_then_term
sys.exit(T.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ddp_sigterm_on_one_process(tmp_path):
    """A stop signal seen by one process only: both stop after the same step and save one resumable state
    (without agreeing, rank 0 would wait in the checkpoint barrier while rank 1 runs the next step)."""
    script, out = tmp_path / "stop.py", tmp_path / "ddp"
    script.write_text(DDP_STOP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           str(script), "--demo", "--output_dir", str(out), "--max_train_steps", "6", "--save_steps", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, ACCELERATE_USE_CPU="1"))
    try:
        stdout, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("processes did not stop together (hung)")
    assert proc.returncode != 0  # 143 from both workers
    assert "stopped by SIGTERM at step 2" in stdout, err[-3000:]
    assert sorted(os.listdir(out / "state")) == ["checkpoint-2"], err[-3000:]
    assert sorted(f for f in os.listdir(out / "state" / "checkpoint-2") if f.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert not os.path.exists(out / "checkpoint-final.safetensors")


@pytest.mark.slow
def test_seed_style_script_runs(tiny_models, csv_data, tmp_path):
    """The shipped launch script (the seed's flags) runs end to end through `accelerate launch`."""
    import shutil

    script = os.path.join(os.path.dirname(T.__file__), "scripts", "Qwen-Image-Edit-2509-lora-efficient.sh")
    data = tmp_path / "data"
    shutil.copytree(csv_data[0], data)
    shutil.copy(csv_data[1], data / "metadata_edit.csv")
    out = tmp_path / "out"
    env = dict(os.environ, MODEL=tiny_models["edit"], DATA=str(data), OUT=str(out))
    res = subprocess.run(["bash", script, "--max_train_steps", "2", "--max_pixels", "4096", "--save_steps", "1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoint-final.safetensors").is_file()
    assert (out / "checkpoint-final-merged.safetensors").is_file()


def test_compile_with_fp8_base_is_a_clear_error(tiny_models, csv_data, tmp_path, capsys):
    """diffusers' layerwise-casting hooks fail under torch.compile (stock too): an error line, not a traceback; the
    default (no --compile) with --fp8_base does not compile."""
    assert run_train(tiny_models["edit"], csv_data, tmp_path / "a", "--fp8_base", "--compile") == 2
    assert "--compile does not work with fp8 layerwise casting" in capsys.readouterr().err
    from qwen_fused.pipeline import compile_blocks

    model = random_transformer(0)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert compile_blocks(model, None, "cuda") is False
