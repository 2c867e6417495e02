"""Full-checkpoint conversion (single file, sharded), loading a merged checkpoint, and `qwen-fused convert`."""
import argparse
import copy
import json
import os

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import TINY_CFG, tiny_transformer

from qwen_fused import fuse_qkv, load_lora
from qwen_fused.checkpoint import convert_checkpoint, from_pretrained, load_checkpoint
from qwen_fused.convert_cli import add_parser

CFG = TINY_CFG


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    base.save_pretrained(root / "sharded", max_shard_size="200KB")
    copy.deepcopy(base).to(torch.bfloat16).save_pretrained(root / "single_bf16")
    return root


def same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert"] + argv)
    return args.func(args)


def test_sharded_round_trip_and_fused_load(base, saved, tmp_path):
    index = json.loads((saved / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard_of = index["weight_map"]
    # q, k, v of some block live in different shards: the conversion must gather across files
    assert any(len({shard_of[f"transformer_blocks.{i}.attn.{n}.weight"] for n in ("to_q", "to_k", "to_v")}) > 1
               for i in range(2))
    s = convert_checkpoint(saved / "sharded", tmp_path / "merged", "to_merged")
    assert s["groups"] == 8 and s["tensors_in"] - s["tensors_out"] == 16
    files = set(os.listdir(tmp_path / "merged"))
    assert "config.json" in files and set(os.listdir(saved / "sharded")) == files
    fused = from_pretrained(tmp_path / "merged")  # empty weights -> fuse -> stream the merged shards in
    same_state(fused.state_dict(), fuse_qkv(copy.deepcopy(base)).state_dict())
    convert_checkpoint(tmp_path / "merged", tmp_path / "back", "to_standard")
    same_state(QwenImageTransformer2DModel.from_pretrained(tmp_path / "back").state_dict(), base.state_dict())
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary leftovers


def test_single_file_bf16(base, saved, tmp_path):
    src = saved / "single_bf16" / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "merged.safetensors"
    convert_checkpoint(src, out, "to_merged")
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["qwen_fused_layout"] == "merged"
    merged = load_file(str(out))
    stock = load_file(str(src))
    w = merged["transformer_blocks.1.attn.add_qkv_proj.weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, torch.cat([stock[f"transformer_blocks.1.attn.{n}.weight"]
                                     for n in ("add_q_proj", "add_k_proj", "add_v_proj")]))
    # a standard checkpoint loads straight into a fused model, and a merged one into a stock model
    fused = fuse_qkv(QwenImageTransformer2DModel(**CFG).to(torch.bfloat16))
    load_checkpoint(fused, src)
    same_state(fused.state_dict(), merged)
    stock_model = QwenImageTransformer2DModel(**CFG).to(torch.bfloat16)
    load_checkpoint(stock_model, out)
    same_state(stock_model.state_dict(), stock)


def test_checkpoint_errors(base, saved, tmp_path):
    src = saved / "single_bf16" / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "m.safetensors"
    convert_checkpoint(src, out, "to_merged")
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_checkpoint(src, out, "to_merged")
    with pytest.raises(ValueError, match="already in merged layout"):
        convert_checkpoint(out, tmp_path / "x.safetensors", "to_merged", overwrite=True)
    assert out.read_bytes() == before
    sd = load_file(str(src))
    del sd["transformer_blocks.0.attn.to_k.bias"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*transformer_blocks\.0\.attn\.to_k\.bias"):
        convert_checkpoint(tmp_path / "partial.safetensors", tmp_path / "p.safetensors", "to_merged")
    (tmp_path / "cut.safetensors").write_bytes(src.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        convert_checkpoint(tmp_path / "cut.safetensors", tmp_path / "c.safetensors", "to_merged")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        convert_checkpoint(tmp_path / "junk.safetensors", tmp_path / "j.safetensors", "to_merged")
    with pytest.raises(ValueError, match="no q/k/v projection keys"):
        save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
        convert_checkpoint(tmp_path / "other.safetensors", tmp_path / "o.safetensors", "to_merged")
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(QwenImageTransformer2DModel(**dict(CFG, num_layers=3)), out)
    assert not any((tmp_path / f).exists() for f in ("p.safetensors", "j.safetensors", "c.safetensors"))


def test_cli_checkpoint(saved, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli(["--input", str(saved / "sharded"), "--output", str(out), "--direction", "to_merged"]) == 0
    text = capsys.readouterr().out
    assert "merged 8 q/k/v groups" in text and "77 tensors -> 61" in text
    assert cli(["--input", str(saved / "sharded"), "--output", str(out), "--direction", "to_merged"]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli(["--input", str(saved / "sharded"), "--output", str(out), "--direction", "to_merged",
                "--overwrite"]) == 0
    assert cli(["--input", str(out), "--output", str(tmp_path / "x"), "--direction", "to_standard",
                "--format", "kohya"]) == 2
    assert "--format applies to LoRA" in capsys.readouterr().err


def test_cli_lora(base, tmp_path, capsys):
    from qwen_fused.cli import main

    g = torch.Generator().manual_seed(3)
    names = [f"transformer_blocks.{b}.attn.{n}" for b in range(2) for n in ("to_q", "to_k", "to_v", "add_v_proj")]
    lora = {}
    for n in names + ["transformer_blocks.0.img_mlp.net.2"]:
        cin = 384 if "mlp" in n else 96
        k = "lora_unet_" + n.replace(".", "_")
        lora[f"{k}.lora_down.weight"] = torch.randn(4, cin, generator=g) * 0.3
        lora[f"{k}.lora_up.weight"] = torch.randn(96, 4, generator=g) * 0.3
        lora[f"{k}.alpha"] = torch.tensor(2.0)
    src = tmp_path / "kohya.safetensors"
    save_file(lora, str(src))
    out = tmp_path / "merged.safetensors"
    assert main(["convert", "--input", str(src), "--output", str(out), "--direction", "to_merged"]) == 0
    text = capsys.readouterr().out
    assert "kohya layout, standard" in text and "diffusers layout, merged" in text and "rank 12" in text
    back = tmp_path / "back.safetensors"
    assert main(["convert", "--input", str(out), "--output", str(back), "--direction", "to_standard",
                 "--format", "kohya"]) == 0
    got = load_file(str(back))
    assert sorted(got) == sorted(lora)
    for k, v in lora.items():  # ranks and factors come back (alpha folded into up where scales differ: not here)
        assert torch.allclose(got[k], v, rtol=0, atol=1e-7), k
    # and the merged file gives the same model as the kohya one
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 5, 24),
                  encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.3]), img_shapes=[[(1, 4, 4)]])
    a = load_lora(fuse_qkv(copy.deepcopy(base)), out)
    b = load_lora(copy.deepcopy(base), src, fuse=True)
    with torch.no_grad():
        ya, yb = a(**inputs).sample, b(**inputs).sample
    assert ((ya - yb).abs().max() / yb.abs().max()).item() <= 1e-5


def test_single_file_folder_stays_a_folder(base, tmp_path):
    """A diffusers folder with one unsharded file converts to a folder (config.json kept) that loads."""
    src = tmp_path / "stock"
    base.save_pretrained(src)
    convert_checkpoint(src, tmp_path / "merged", "to_merged")
    assert sorted(os.listdir(tmp_path / "merged")) == sorted(os.listdir(src))
    same_state(from_pretrained(tmp_path / "merged").state_dict(), fuse_qkv(copy.deepcopy(base)).state_dict())
    mode = os.stat(tmp_path / "merged").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # a normal folder, not mkdtemp's private 0700


def test_overwrite_never_swaps_file_and_folder(saved, tmp_path):
    src = saved / "single_bf16" / "diffusion_pytorch_model.safetensors"
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="folder"):
        convert_checkpoint(src, keep, "to_merged", overwrite=True)
    assert (keep / "notes.txt").read_text() == "user data"
    out = tmp_path / "file.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="file"):
        convert_checkpoint(saved / "sharded", out, "to_merged", overwrite=True)
    assert out.read_bytes() == b"x" and [f for f in os.listdir(tmp_path) if f.startswith(".")] == []


def test_cli_lora_folder(base, tmp_path, capsys):
    """A folder written by diffusers' save_lora_weights is a LoRA, not a checkpoint."""
    from diffusers import QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    stock = copy.deepcopy(base)
    stock.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():
        for n, p in stock.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    QwenImagePipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(stock),
                                        transformer_lora_adapter_metadata=stock.peft_config["default"].to_dict())
    out = tmp_path / "merged.safetensors"
    assert cli(["--input", str(tmp_path / "lora"), "--output", str(out), "--direction", "to_merged"]) == 0
    assert "diffusers layout, standard" in capsys.readouterr().out
    assert any(k.endswith("to_qkv.lora_A.weight") for k in load_file(str(out)))
    # alpha 4 / r 2 lives only in diffusers' file metadata: it must survive the conversion
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 5, 24),
                  encoder_hidden_states_mask=torch.ones(1, 5), timestep=torch.tensor([0.3]), img_shapes=[[(1, 4, 4)]])
    fused = load_lora(fuse_qkv(copy.deepcopy(base)), out)
    with torch.no_grad():
        y, ref = fused(**inputs).sample, stock(**inputs).sample
    assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_loading_keeps_live_parameters_and_checkpoint_dtype(saved):
    """Loading into a live model copies in place, as `load_state_dict` does (accelerate's
    `set_module_tensor_to_device` would swap the Parameter objects: an optimizer would keep the old ones), and an
    empty-weights model takes the checkpoint's dtype (accelerate's default casts to the meta tensor's fp32)."""
    src = saved / "single_bf16" / "diffusion_pytorch_model.safetensors"
    model = fuse_qkv(QwenImageTransformer2DModel(**CFG))  # fp32
    before = dict(model.named_parameters())
    load_checkpoint(model, src)
    assert all(p is before[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    stock = load_file(str(src))
    assert torch.equal(model.transformer_blocks[0].attn.to_qkv.weight,
                       torch.cat([stock[f"transformer_blocks.0.attn.{n}.weight"]
                                  for n in ("to_q", "to_k", "to_v")]).float())
    empty = from_pretrained(saved / "single_bf16")  # meta weights, filled from the bf16 file
    assert {p.dtype for p in empty.parameters()} == {torch.bfloat16}
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in empty.parameters())
