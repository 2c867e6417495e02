"""diffusers' own LoRA API on a fused model behaves as on the stock model (issue 12, items 3 and 4).

Every comparison is against the stock diffusers model (or pipeline) doing the same calls with the same LoRA.
"""
import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import assert_close, tiny_inputs, tiny_transformer

import qwen_fused
from qwen_fused.pipeline import call_pipeline
from qwen_fused.tiny import tiny_edit_pipeline

QKV = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
# several ranks and alphas: the config must reach every module, through the merged layout and back. q, k and v
# share one scale here, as an adapter to train on a fused model must (one merged adapter has one scale)
CFG = dict(r=4, lora_alpha=8, target_modules=QKV + ["to_out.0", "img_mlp.net.2"], init_lora_weights=False,
           rank_pattern={"to_k": 2, "add_v_proj": 3}, alpha_pattern={"to_k": 4.0, "add_v_proj": 6.0, "to_out.0": 1.0})
# a LoRA to load may give each of q, k and v its own scale: folded into B exactly
UNEQUAL = dict(alpha_pattern={"to_v": 3.0, "to_out.0": 1.0})


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs(batch=2, txt_len=7, img_shapes=((1, 4, 4),), valid_lens=(7, 5))


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def copy_of(base, fused):
    m = copy.deepcopy(base)
    return qwen_fused.fuse_qkv(m) if fused else m


def randomize_lora(model, seed=0):
    """Random LoRA B (and bias), so that every part of the adapter changes the output; a merged B that stands
    for separate q/k/v LoRAs stays block-diagonal, as training keeps it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            for adapter, b in getattr(mod, "lora_B", {}).items():
                b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.3)
                b.weight.mul_(getattr(mod, "_qwen_fused_block_mask", {}).get(adapter, 1))
                if b.bias is not None:
                    b.bias.copy_(torch.randn(b.bias.shape, generator=g) * 0.3)
    return model


def stock_with_lora(base, seed=0, **overrides):
    model = copy_of(base, False)
    model.add_adapter(LoraConfig(**{**CFG, **overrides}))
    return randomize_lora(model, seed)


def file_keys(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys()), f.metadata()


FILE = dict(prefix=None, weight_name="pytorch_lora_weights.safetensors")  # diffusers reads the config from it


def loaded(base, fused, source, **kwargs):
    model = copy_of(base, fused)
    model.load_lora_adapter(source, **kwargs)
    return model


def test_stock_saved_lora_loads_into_fused_model(base, inputs, tmp_path):
    stock = stock_with_lora(base, **UNEQUAL)
    ref = run(stock, inputs)
    stock.save_lora_adapter(tmp_path)
    fused = loaded(base, True, tmp_path, **FILE)
    assert_close(run(fused, inputs), ref, 1e-5, "stock-saved LoRA on the fused model")
    assert hasattr(fused.transformer_blocks[0].attn.to_qkv, "lora_A")
    # a file path without weight_name: diffusers 0.42 skips the file's config there (scale 1 everywhere);
    # the fused model does what the stock model does with the same call
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert_close(run(loaded(base, True, path, prefix=None), inputs),
                 run(loaded(base, False, path, prefix=None), inputs), 1e-5, "file path, no weight_name")
    # a diffusers-format state dict with the `transformer.` prefix and no metadata (scale 1 everywhere)
    nometa = stock_with_lora(base, seed=1, lora_alpha=4, alpha_pattern={}, rank_pattern={})
    sd = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(nometa).items()}
    fused = copy_of(base, True)
    fused.load_lora_adapter(sd, adapter_name="x")
    assert_close(run(fused, inputs), run(nometa, inputs), 1e-5, "prefixed state dict, no metadata")


def test_fused_saved_lora_loads_into_stock_model(base, inputs, tmp_path):
    fused = copy_of(base, True)
    with pytest.warns(UserWarning, match="mapped to the merged"):
        fused.add_adapter(LoraConfig(**CFG))
    randomize_lora(fused)
    ref = run(fused, inputs)
    fused.save_lora_adapter(tmp_path)
    keys, meta = file_keys(tmp_path / "pytorch_lora_weights.safetensors")
    assert not any("to_qkv" in k or "add_qkv_proj" in k for k in keys), "saved file must be in standard layout"
    assert "transformer_blocks.0.attn.add_k_proj.lora_A.weight" in keys
    sd = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    # each part keeps its own rank (block-diagonal B splits back exactly)
    assert sd["transformer_blocks.0.attn.to_k.lora_A.weight"].shape[0] == 2
    assert sd["transformer_blocks.0.attn.add_v_proj.lora_A.weight"].shape[0] == 3
    assert_close(run(loaded(base, False, tmp_path, **FILE), inputs), ref, 1e-5, "fused-saved LoRA on the stock model")
    assert_close(run(loaded(base, True, tmp_path, **FILE), inputs), ref, 1e-5, "fused -> file -> fused")


def test_fresh_adapter_saves_per_part_ranks(base, tmp_path):
    """A fresh (all-zero B) standard-name adapter on a fused model saves with the stock ranks, not the merged."""
    fused = copy_of(base, True)
    with pytest.warns(UserWarning):
        fused.add_adapter(LoraConfig(**{**CFG, "init_lora_weights": True}))
    fused.save_lora_adapter(tmp_path)
    stock = stock_with_lora(base)
    stock.save_lora_adapter(tmp_path / "stock")
    got = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    ref = load_file(tmp_path / "stock" / "pytorch_lora_weights.safetensors")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}


def test_lora_bias_round_trips(base, inputs, tmp_path):
    stock = stock_with_lora(base, lora_bias=True, **UNEQUAL)
    assert any(k.endswith("lora_B.bias") for k in get_peft_model_state_dict(stock))
    stock.save_lora_adapter(tmp_path / "stock")
    fused = loaded(base, True, tmp_path / "stock", **FILE)
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, "stock lora_bias LoRA on the fused model")

    fused = copy_of(base, True)
    with pytest.warns(UserWarning):
        fused.add_adapter(LoraConfig(**{**CFG, "lora_bias": True}))
    assert fused.transformer_blocks[0].attn.to_qkv.lora_B["default"].bias is not None
    randomize_lora(fused, seed=3)
    ref = run(fused, inputs)
    fused.save_lora_adapter(tmp_path / "fused")
    assert "transformer_blocks.1.attn.to_v.lora_B.bias" in file_keys(tmp_path / "fused" / FILE["weight_name"])[0]
    assert_close(run(loaded(base, False, tmp_path / "fused", **FILE), inputs), ref, 1e-5,
                 "fused lora_bias LoRA on the stock model")
    assert_close(run(loaded(base, True, tmp_path / "fused", **FILE), inputs), ref, 1e-5,
                 "lora_bias fused -> file -> fused")
    (tmp_path / "ours").mkdir()
    qwen_fused.save_lora(fused, tmp_path / "ours" / "lora.safetensors")  # this package's writer, same file for stock
    stock = loaded(base, False, tmp_path / "ours", weight_name="lora.safetensors")
    assert_close(run(stock, inputs), ref, 1e-5, "qwen_fused.save_lora with lora_bias, loaded by stock diffusers")


def test_keys_peft_does_not_load_warn_as_on_stock(base, inputs):
    """diffusers' loader warns about keys peft does not load (an unknown kind, a module the model lacks) and loads
    the rest; so does a fused model, with stock's words (qwen_fused.load_lora refuses them instead)."""
    import logging

    sd = {**get_peft_model_state_dict(stock_with_lora(base)),
          "transformer_blocks.0.attn.to_q.lora_X.weight": torch.zeros(2, 2),
          "transformer_blocks.0.attn.to_nothing.lora_A.weight": torch.zeros(2, 96),
          "transformer_blocks.0.attn.to_nothing.lora_B.weight": torch.zeros(96, 2)}
    outs, logs = [], []
    for fused in (False, True):
        model, records = copy_of(base, fused), []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("diffusers").addHandler(handler)
        try:
            model.load_lora_adapter(dict(sd), prefix=None)
        finally:
            logging.getLogger("diffusers").removeHandler(handler)
        outs.append(run(model, inputs))
        logs.append(records)
    assert logs[0] == logs[1] and "to_nothing.lora_A.weight" in logs[0][0] and "lora_X" in logs[0][0]
    assert_close(outs[1], outs[0], 1e-5, "the rest of the LoRA")
    with pytest.raises(ValueError, match="lora_X"):
        qwen_fused.load_lora(copy_of(base, True), sd)


# ---- pipelines --------------------------------------------------------------------------------------------------

def edit(pipe):
    image = Image.fromarray((np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251).astype(np.uint8))
    # a small condition-image area: the stock 1024 * 1024 takes a minute per call on a CPU
    return call_pipeline(pipe, area=64 * 64, image=image, prompt="a cat", num_inference_steps=2, true_cfg_scale=1.0,
                         height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images


def pipelines():
    stock, fused = tiny_edit_pipeline(seed=0), tiny_edit_pipeline(seed=0)
    qwen_fused.fuse_qkv(fused)
    return stock, fused


def same(stock, fused, what):
    a, b = edit(stock), edit(fused)
    assert_close(b, a, 1e-5, what)
    return a


def test_pipeline_lora_api_matches_stock(tmp_path):
    stock, fused = pipelines()
    plain = same(stock, fused, "no LoRA")
    lora = stock_with_lora(tiny_edit_pipeline(seed=0).transformer, seed=5,
                           target_modules=QKV + ["to_out.0", "to_add_out"], rank_pattern={}, alpha_pattern={})
    path = tmp_path / "style.safetensors"
    save_file({f"transformer.{k}": v for k, v in get_peft_model_state_dict(lora).items()}, str(path))
    for pipe in (stock, fused):
        pipe.load_lora_weights(path, adapter_name="style")
    styled = same(stock, fused, "load_lora_weights")
    assert (styled - plain).abs().max() > 1e-3, "the LoRA must change the image"
    for pipe in (stock, fused):
        pipe.load_lora_weights(path, adapter_name="other")
        pipe.set_adapters(["style", "other"], adapter_weights=[0.5, 0.7])
    same(stock, fused, "set_adapters")
    assert fused.get_list_adapters() == stock.get_list_adapters() == {"transformer": ["style", "other"]}
    assert fused.get_active_adapters() == stock.get_active_adapters()
    for pipe in (stock, fused):
        pipe.delete_adapters("other")
        pipe.set_adapters("style", adapter_weights=0.8)
    same(stock, fused, "delete_adapters")
    for pipe in (stock, fused):
        pipe.fuse_lora(components=["transformer"], lora_scale=0.6)
    same(stock, fused, "fuse_lora")
    for pipe in (stock, fused):
        pipe.unfuse_lora()
    same(stock, fused, "unfuse_lora")
    for pipe in (stock, fused):
        pipe.unload_lora_weights()
    assert_close(same(stock, fused, "unload_lora_weights"), plain, 1e-6, "unloaded")


def test_pipeline_save_lora_weights_writes_standard_layout(tmp_path):
    stock, fused = pipelines()
    fused.transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_qkv", "add_qkv_proj"],
                                             init_lora_weights=False))
    randomize_lora(fused.transformer, seed=7)
    ref = edit(fused)
    type(fused).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(fused.transformer),
                                  transformer_lora_adapter_metadata=fused.transformer.peft_config["default"].to_dict())
    keys, meta = file_keys(tmp_path / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert not any("qkv" in k for k in keys) and "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "qkv" not in json.dumps(json.loads(meta["lora_adapter_metadata"]))
    stock.load_lora_weights(tmp_path)
    assert_close(edit(stock), ref, 1e-5, "pipe.save_lora_weights of a fused model, loaded by stock diffusers")


# ---- one rule for standard names (item 4) ----------------------------------------------------------------------

def test_cli_and_api_build_the_same_lora_for_standard_names(base):
    from qwen_fused.train_lora import add_training_lora, lora_targets

    api, cli = copy_of(base, True), copy_of(base, True)
    with pytest.warns(UserWarning):
        api.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                   init_lora_weights="gaussian"))
    with pytest.warns(UserWarning):
        add_training_lora(cli, 4, 4, lora_targets("to_q,to_k,to_v"))
    for model in (api, cli):
        layer = model.transformer_blocks[0].attn.to_qkv
        assert layer.r["default"] == 12 and layer.scaling["default"] == 1.0  # three rank-4 parts, as stock peft
        assert layer._qwen_fused_block_mask["default"].sum() == 3 * 4 * layer.lora_B["default"].weight.shape[0] / 3


# ---- casting, offloading and other hooks (item 2) ----------------------------------------------------------------

def test_layerwise_fp8_casting_matches_stock(base, inputs):
    stock, fused = copy_of(base, False), copy_of(base, True)
    full = run(stock, inputs)
    for model in (stock, fused):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert fused.transformer_blocks[0].attn.to_qkv.weight.dtype == torch.float8_e4m3fn
    ref = run(stock, inputs)
    assert_close(run(fused, inputs), ref, 1e-5, "fp8 layerwise casting")
    assert (ref - full).abs().max() > 1e-3 * full.abs().max(), "the fp8 storage must take effect"
    assert fused.transformer_blocks[0].attn.to_qkv.weight.dtype == torch.float8_e4m3fn  # stored again after use


def test_layerwise_fp8_casting_with_lora_matches_stock(base, inputs, tmp_path):
    stock = stock_with_lora(base, **UNEQUAL)
    stock.save_lora_adapter(tmp_path)
    fused = loaded(base, True, tmp_path, **FILE)
    for model in (stock, fused):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, "fp8 layerwise casting with a LoRA")


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_matches_stock(base, inputs, offload_type):
    """CPU only here (onload = offload device), so this checks that every hook still runs and the result is the
    same; it cannot see a weight left on the wrong device."""
    stock, fused = copy_of(base, False), copy_of(base, True)
    ref = run(stock, inputs)
    fused.enable_group_offload(torch.device("cpu"), offload_type=offload_type, num_blocks_per_group=1)
    assert_close(run(fused, inputs), ref, 1e-5, f"group offloading ({offload_type})")


def test_hooks_on_norms_and_projections_run(base, inputs):
    """Forward hooks on the QK norms and the merged projections change the result as on the stock model."""
    stock, fused = copy_of(base, False), copy_of(base, True)

    def double(module, args, output):
        return output * 2

    for model, projs in ((stock, ("to_q", "to_k", "to_v")), (fused, ("to_qkv",))):
        attn = model.transformer_blocks[0].attn
        attn.norm_added_k.register_forward_hook(double)
        for name in projs:
            getattr(attn, name).register_forward_hook(double)
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, "hooked norms and projections")
