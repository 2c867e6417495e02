"""Model names resolve as `DiffusionPipeline.from_pretrained` resolves them: a local folder, the Hugging Face
cache or the Hub. The cache here is built in a temp folder, offline, holding a saved tiny pipeline."""
import os
import shutil

import huggingface_hub.constants
import pytest
from helpers import random_image
from PIL import Image

from qwen_fused.cli import main
from qwen_fused.demo import make_demo_dataset
from qwen_fused.pipeline import edit_variant, load_pipeline
from qwen_fused.tiny import save_tiny_pipeline

REPO = "Org/Tiny-Edit-2509"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "tiny"
    save_tiny_pipeline(path, variant="2509")
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache in tmp_path. huggingface_hub reads its environment once, at import:
    the environment is set for subprocesses, its constants for this process."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache, repo, folder):
    """`folder` as the cached snapshot of `repo` (what a download leaves: models--Org--Name/snapshots/<commit>/
    and refs/main naming that commit)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / COMMIT)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def test_hub_id_loads_from_the_cache(hf_cache, saved):
    cache_model(hf_cache, REPO, saved)
    pipe = load_pipeline(REPO)
    assert edit_variant(pipe) == "2509"


def test_edit_cli_with_hub_id(hf_cache, saved, tmp_path, capsys):
    cache_model(hf_cache, REPO, saved)
    image = random_image(seed=0, path=tmp_path / "in.png")
    out = tmp_path / "out.png"
    rc = main(["edit", "--model", REPO, "--image", str(image), "--prompt", "make it red", "--steps", "1",
               "--true_cfg_scale", "1", "--height", "32", "--width", "32", "--area", "4096", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out).size == (32, 32)


def test_train_cli_with_hub_id(hf_cache, tmp_path):
    save_tiny_pipeline(tmp_path / "tiny", variant="edit")
    cache_model(hf_cache, "Org/Tiny-Edit", tmp_path / "tiny")
    data = tmp_path / "data"
    metadata = make_demo_dataset(str(data), n=1)
    out = tmp_path / "run"
    assert main(["train", "--pretrained_model_name_or_path", "Org/Tiny-Edit", "--dataset_base_path", str(data),
                 "--dataset_metadata_path", metadata, "--output_dir", str(out), "--max_pixels", "4096",
                 "--lora_rank", "2", "--max_train_steps", "1"]) == 0
    assert (out / "checkpoint-final.safetensors").is_file()


def test_offline_and_not_cached_says_what_was_tried(hf_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_pipeline("Org/Not-Cached")
    msg = str(e.value)
    assert "Org/Not-Cached" in msg
    assert f"no local folder {os.path.join(str(tmp_path), 'Org', 'Not-Cached')}" in msg
    assert f"not in the Hugging Face cache at {hf_cache}" in msg
    assert "offline" in msg and "HF_HUB_OFFLINE" in msg


def test_offline_and_not_cached_is_an_error_line(hf_cache, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["edit", "--model", "Org/Not-Cached", "--image", str(image), "--prompt", "x",
                 "--output", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "qwen-fused edit: error:" in err and "Org/Not-Cached" in err and "Hugging Face cache" in err


@pytest.mark.parametrize("name", ["./no_model", "~/no_model_here_xyz", "a/b/c", "/no/such/model"])
def test_missing_local_path_is_a_missing_folder(hf_cache, name):
    with pytest.raises(FileNotFoundError, match=r"model folder .* does not exist"):
        load_pipeline(name)
