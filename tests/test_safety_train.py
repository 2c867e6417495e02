"""Issue 21 for `qwen-fused train`: nothing a user made is lost (a stop during encoding keeps the cache), the
plain-named checkpoint is the file any tool reads (stock diffusers gets every LoRA module), and bad or odd input
is one clear line with exit 2."""
import os
import signal

import pytest
import torch

import qwen_fused
from qwen_fused import data as D
from qwen_fused import encode as E
from qwen_fused import train as T
from qwen_fused.demo import make_demo_dataset
from qwen_fused.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / "edit")
    save_tiny_pipeline(path, seed=0, variant="edit")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return str(folder), make_demo_dataset(str(folder), n=3, edits=1)


def run_train(model, data, out, *extra):
    return T.main(["--pretrained_model_name_or_path", model, "--dataset_base_path", data[0],
                   "--dataset_metadata_path", data[1], "--output_dir", str(out), "--max_pixels", "4096",
                   "--lora_rank", "2", "--max_train_steps", "1", "--save_steps", "1", *extra])


def last_line(err):
    return [line for line in err.splitlines() if line.strip()][-1]


class Escaped(Exception):
    pass


def escaped(signum, frame):
    raise Escaped


@pytest.mark.parametrize("how,code", [("ctrl_c", 130), ("sigterm", 143), ("error", 2)])
def test_stop_during_encoding_keeps_the_cache(how, code, model, data, tmp_path, monkeypatch, capsys):
    """A stop (Ctrl-C, SIGTERM) or an error while samples are encoded: one line, no traceback, and the samples
    encoded so far stay in <output_dir>/cache for the next run (the rest of the half-made folder goes)."""
    encode, calls = E.encode_sample, []

    def encode_then_stop(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            if how == "ctrl_c":
                raise KeyboardInterrupt
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise D.DataError("meta.csv row 4: cannot read image x.png")
        return encode(*a, **k)

    monkeypatch.setattr(E, "encode_sample", encode_then_stop)
    out = tmp_path / "run"
    # a stop that escapes `train` fails this test instead of stopping pytest (SIGTERM: instead of killing it)
    old = signal.signal(signal.SIGTERM, escaped)
    try:
        assert run_train(model, data, out, "--cache") == code
    except (KeyboardInterrupt, Escaped) as e:
        pytest.fail(f"{type(e).__name__} escaped train")
    finally:
        signal.signal(signal.SIGTERM, old)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = last_line(err)
    assert line.startswith("qwen-fused train: "), err
    assert "stopped by" in line if how != "error" else "error: meta.csv row 4" in line, line
    assert "2 encoded samples kept in" in line, line
    assert os.listdir(out) == ["cache"] and len(os.listdir(out / "cache")) == 2
    monkeypatch.setattr(E, "encode_sample", encode)
    assert run_train(model, data, out, "--cache") == 0
    assert "2 samples reused, 1 encoded" in capsys.readouterr().out


def test_stop_without_cache_removes_the_folder_it_made(model, data, tmp_path, monkeypatch, capsys):
    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "encode_sample", stop)
    out = tmp_path / "new" / "run"
    try:
        assert run_train(model, data, out) == 130
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train")
    assert last_line(capsys.readouterr().err) == "qwen-fused train: stopped by SIGINT before training"
    assert not os.path.exists(tmp_path / "new")


def lora_modules(transformer):
    """Names of the modules that carry a LoRA (peft layers with at least one adapter)."""
    return {n for n, m in transformer.named_modules() if getattr(m, "lora_A", None)}


def test_plain_named_checkpoint_is_the_standard_layout(model, data, tmp_path):
    """`checkpoint-N.safetensors` and `checkpoint-final.safetensors` load into stock diffusers (no qwen_fused
    involved) with every trained module, q/k/v included; the `-merged` copy is the same model for this package."""
    from diffusers import DiffusionPipeline, QwenImageTransformer2DModel

    from qwen_fused import train_lora as L

    out = tmp_path / "run"
    assert run_train(model, data, out, "--max_train_steps", "2") == 0
    base = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    last = f"transformer_blocks.{len(base.transformer_blocks) - 1}."
    leaves = L.stock_targets(L.lora_targets(L.DEFAULT_TARGETS))
    trained = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_")
               and n.endswith(tuple(f".{t}" for t in leaves))
               and not (n.startswith(last) and n.endswith(L.DEAD_IN_LAST_BLOCK))}
    assert {n.rsplit(".", 1)[-1] for n in trained} >= {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
    for name in ("checkpoint-1", "checkpoint-final"):
        pipe = DiffusionPipeline.from_pretrained(model)
        pipe.load_lora_weights(str(out / f"{name}.safetensors"))
        assert lora_modules(pipe.transformer) == trained, name
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == [
        "checkpoint-1-merged.safetensors", "checkpoint-1.safetensors", "checkpoint-2-merged.safetensors",
        "checkpoint-2.safetensors", "checkpoint-final-merged.safetensors", "checkpoint-final.safetensors"]
    # qwen_fused reads both files: the same model
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g), encoder_hidden_states_mask=torch.ones(1, 5),
                  timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]])
    outputs = []
    for suffix in ("", "-merged"):
        fused = qwen_fused.fuse_qkv(QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer"))
        qwen_fused.load_lora(fused, str(out / f"checkpoint-final{suffix}.safetensors"))
        with torch.no_grad():
            outputs.append(fused(**inputs).sample)
    with torch.no_grad():
        plain = base(**inputs).sample
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5 * outputs[1].abs().max()
    assert (outputs[1] - plain).abs().max() > 1e-4 * plain.abs().max()  # the LoRA does something


# ----------------------------------------------------------------------------------------------------------
# bad or odd input: one line naming the problem, exit 2, before any model loads

class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    def load(*a, **k):
        raise ModelLoaded

    monkeypatch.setattr(T, "load_pipeline", load)


@pytest.mark.parametrize("case,needle", [
    ("model_not_a_pipeline", "no model_index.json, not a diffusers pipeline folder"),
    ("model_is_a_component", "no model_index.json, one model of a pipeline"),
    ("metadata_is_a_folder", "is a folder; pass the .csv, .json or .jsonl file"),
    ("lora_fused_is_a_folder", "--lora_fused {tmp}/loras is a folder with 0 .safetensors files"),
    ("max_pixels_10", "--max_pixels 10 is below the smallest training size, 32 x 32 = 1024 pixels"),
    ("num_epochs_0", "--num_epochs must be >= 1, got 0"),
    ("max_train_steps_0", "--max_train_steps must be >= 1, got 0"),
    ("negative_learning_rate", "--learning_rate must be > 0, got -0.0001"),
    ("checkpoints_total_limit_0", "--checkpoints_total_limit must be >= 1, got 0"),
    ("model_is_text_to_image", "QwenImagePipeline is not supported: qwen-fused trains and edits with"),
    ("validation_prompt_without_image", "--validation_prompt needs --validation_image (an edit model edits an image"),
    ("edit_model_row_without_edit_image", "meta.csv row 5: missing edit_image (an edit model needs a condition image"),
])
def test_bad_input_is_one_line(case, needle, model, data, tmp_path, no_model_load, capsys):
    from qwen_fused.cli import main

    base, meta = data
    argv = ["train", "--pretrained_model_name_or_path", model, "--dataset_base_path", base,
            "--dataset_metadata_path", meta, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]
    if case == "model_not_a_pipeline":
        argv[2] = str(tmp_path)
    elif case == "model_is_a_component":
        argv[2] = os.path.join(model, "transformer")
    elif case == "metadata_is_a_folder":
        argv[6] = base
    elif case == "lora_fused_is_a_folder":
        (tmp_path / "loras").mkdir()
        argv += ["--lora_fused", str(tmp_path / "loras")]
    elif case == "max_pixels_10":
        argv += ["--max_pixels", "10"]
    elif case == "num_epochs_0":
        argv = argv[:-2] + ["--num_epochs", "0"]
    elif case == "max_train_steps_0":
        argv[-1] = "0"
    elif case == "negative_learning_rate":  # a negative number in e-notation is a value, not an option
        argv += ["--learning_rate", "-1e-4"]
    elif case == "checkpoints_total_limit_0":
        argv += ["--checkpoints_total_limit", "0"]
    elif case == "validation_prompt_without_image":
        argv += ["--validation_prompt", "redder"]
    elif case == "model_is_text_to_image":  # known from model_index.json alone, before loading
        (tmp_path / "t2i").mkdir()
        (tmp_path / "t2i" / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
        argv[2] = str(tmp_path / "t2i")
    elif case == "edit_model_row_without_edit_image":  # an edit model's rule, from its model_index.json
        with open(meta) as f:
            lines = f.read().splitlines()
        lines.append(lines[-1].split(",")[0] + ",,a text-to-image row")
        (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")
        argv[6] = str(tmp_path / "meta.csv")
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = last_line(err)
    assert line.startswith("qwen-fused train: error: ") and needle.format(tmp=tmp_path) in line, err
    assert "Traceback" not in err and "usage:" not in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# what users of diffusers' scripts, musubi-tuner and ai-toolkit expect

@pytest.mark.parametrize("argv", [["train", "--help"], ["check", "--help"], ["--help"]], ids=["train", "check", "bare"])
def test_help_imports_neither_torch_nor_diffusers(argv):
    import subprocess
    import sys

    code = ("import sys\nfrom qwen_fused.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    shown = {"train": ("Output folder:", "--checkpoints_total_limit"), "check": ("float64", "--no_real_width"),
             "--help": ("qwen-fused train", "COMMAND")}[argv[0]]
    assert all(s in res.stdout for s in shown), res.stdout[-1000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout[-300:]


def test_flags_take_either_spelling():
    """Underscores are the flags' spelling (the seed's and diffusers' scripts); dashes are accepted for them, and
    argparse's own dashed `--no-compile` takes underscores; abbreviations stay unambiguous."""
    from qwen_fused.cli import build_parser

    args = build_parser("train").parse_args(["train", "--learning-rate", "2e-4", "--lora-rank=8", "--no_compile",
                                             "--use-gradient-check", "--output_dir", "o"])
    assert (args.learning_rate, args.lora_rank, args.compile, args.use_gradient_checkpointing) == (2e-4, 8, False, True)
    edit = build_parser("edit").parse_args(["edit", "--no-fuse", "--negative-prompt", "x", "--true-cfg-scale", "-1e-1"])
    assert (edit.fuse, edit.negative_prompt, edit.true_cfg_scale) == (False, "x", -0.1)
    assert build_parser("edit").parse_args(["edit", "--no_fuse"]).fuse is False


def test_resume_latest_in_an_empty_folder_starts_a_new_run(model, data, tmp_path, no_model_load, capsys):
    """As diffusers' scripts do: nothing to resume yet is a new run (here: it gets as far as loading the model);
    a folder with LoRA files but no state stays an error (a new run would overwrite them)."""
    out = tmp_path / "out"
    with pytest.raises(ModelLoaded):
        run_train(model, data, out, "--resume_from_checkpoint", "latest")
    assert "no checkpoint in" in capsys.readouterr().out
    out.mkdir(exist_ok=True)
    (out / "checkpoint-4.safetensors").write_bytes(b"")
    assert run_train(model, data, out, "--resume_from_checkpoint", "latest") == 2
    assert "nothing to resume from" in capsys.readouterr().err


def test_limit_name_summary_and_validation(model, data, tmp_path, capsys):
    """--checkpoints_total_limit keeps the newest checkpoints (LoRA files and states), --output_name names the
    final LoRA, a run summary comes first, and every --validation_prompt gives an image, on disk and in the
    tracker."""
    out = tmp_path / "run"
    image = os.path.join(data[0], "images", "0_edit0.png")
    assert run_train(model, data, out, "--max_train_steps", "3", "--checkpoints_total_limit", "2",
                     "--output_name", "my-style", "--report_to", "tensorboard", "--validation_image", image,
                     "--validation_prompt", "redder", "--validation_prompt", "bluer", "--validation_steps", "3",
                     "--validation_inference_steps", "1") == 0
    printed = capsys.readouterr().out
    summary = next(line for line in printed.splitlines() if line.startswith("run: "))
    assert "3 samples" in summary and "3 steps" in summary and "trainable parameters" in summary, summary
    assert "not compiled" in summary and "LoRA rank 2" in summary, summary
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == [
        "checkpoint-2-merged.safetensors", "checkpoint-2.safetensors", "checkpoint-3-merged.safetensors",
        "checkpoint-3.safetensors", "my-style-merged.safetensors", "my-style.safetensors"]
    assert sorted(os.listdir(out / "state")) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(os.listdir(out / "validation")) == ["step-3-0.png", "step-3-1.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(r, f) for r, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events")]
    tags = set()
    for path in events:
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    assert {"validation/0", "validation/1"} <= tags, tags


def test_demo_outputs_do_not_pile_up(tmp_path, monkeypatch):
    """Each `train --demo` / `edit --demo` without an output replaces the previous demo's output (one folder, one
    file in the temp dir) instead of leaving a new temp folder per run."""
    import tempfile

    from qwen_fused.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for _ in range(2):
        assert main(["train", "--demo", "--max_train_steps", "1"]) == 0
        assert main(["edit", "--demo"]) == 0
    outputs = sorted(e for e in os.listdir(tmp_path) if "output" in e or e.endswith(".png"))
    assert outputs == ["qwen-fused-demo-edit.png", "qwen-fused-demo-output"], outputs
    assert os.path.isfile(tmp_path / "qwen-fused-demo-output" / "checkpoint-final.safetensors")
