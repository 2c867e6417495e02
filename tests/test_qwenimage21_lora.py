"""LoRA on Qwen-Image 2.1 (issue 20, item 4): every layout `load_lora` reads, on stock and fused 2.1 models.

The reference is always stock diffusers + peft: a stock peft adapter on the stock tiny 2.1 transformer, on every
kind of Linear the model has (attention, SwiGLU parts, modulation, txt_in/img_in, time embedding, output). Its
state dict is written in each layout by hand here (not by qwen_fused's writer), loaded onto a stock and a fused
model (as an adapter and with fuse=True), and must give stock's output (fp32, 1e-5 relative). Merged <-> standard
conversion is exact both ways; ComfyUI's merged `img_mlp.gate_up` (gate rows first) loads onto stock, fused and
merged-MLP models; `gate_layer`/`proj` LoRAs map onto a merged MLP's `gate_up`; diffusers' own LoRA API on a fused
model gives stock's output; keys that match no module raise.
"""
import copy

import pytest
import torch
from helpers import assert_close

import qwen_fused
from qwen_fused.families.tiny21 import random_inputs, random_transformer
from qwen_fused.lora import convert_lora, detect_lora_layout, load_lora, parse_lora, save_lora

TOL = 1e-5
R = 2
# every kind of Linear of the 2.1 transformer (real names: diffusers' transformer_qwenimage21.py)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out", "modulation.1",
           "txt_in.in_layer", "txt_in.out_layer", "img_in", "norm_out.linear", "proj_out",
           "time_text_embed.timestep_embedder.linear_1"]
LAYOUTS = ["diffusers", "peft", "diffsynth", "ai-toolkit", "comfyui", "kohya", "lightning"]
DOWN_UP = {"comfyui", "kohya", "lightning"}  # lora_down/lora_up layouts carry .alpha keys


@pytest.fixture(scope="module")
def base():
    return random_transformer()


@pytest.fixture(scope="module")
def inputs(base):
    return random_inputs(base, text=(3, 2))


def run(model, kw):
    with torch.no_grad():
        return model(**kw).sample


def stock_peft(base, alpha, targets=TARGETS, seed=0):
    """The stock model with a stock peft adapter (random A and B: a zero B would hide a wrong layout)."""
    from peft import LoraConfig

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=R, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    return model


def peft_state_dict(model):
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def write(peft_sd, layout, alpha=None):
    """A peft state dict (`<module>.lora_A.weight`) in `layout`'s keys, written here by hand."""
    prefix = {"diffusers": "transformer.", "ai-toolkit": "diffusion_model.", "comfyui": "diffusion_model.",
              "kohya": "lora_unet_"}.get(layout, "")
    out = {}
    for key, t in peft_sd.items():
        module, ab = key.split(".lora_")
        is_a = ab.startswith("A")
        base = prefix + (module.replace(".", "_") if layout == "kohya" else module)
        if layout in DOWN_UP:
            out[f"{base}.lora_{'down' if is_a else 'up'}.weight"] = t
            if alpha is not None:
                out[f"{base}.alpha"] = torch.tensor(float(alpha))
        else:
            out[f"{base}.lora_{'A' if is_a else 'B'}{'.default' if layout == 'diffsynth' else ''}.weight"] = t
    return out


@pytest.fixture(scope="module")
def refs(base, inputs):
    """{alpha: (stock peft output, peft state dict)}: scale 1 for the lora_A layouts (no alpha keys), 1.5 for the
    lora_down ones (alpha keys)."""
    out = {}
    for alpha in (R, 1.5 * R):
        model = stock_peft(base, alpha)
        out[alpha] = run(model, inputs), peft_state_dict(model)
    return out


def _target(base, fused, swiglu=False):
    model = copy.deepcopy(base)
    if fused:
        qwen_fused.fuse_qkv(model)
    if swiglu:
        qwen_fused.fuse_swiglu(model)
    return model


def _case(refs, layout):
    alpha = 1.5 * R if layout in DOWN_UP else R
    ref, sd = refs[alpha]
    return ref, write(sd, layout, alpha if layout in DOWN_UP else None)


# ------------------------------------------------------------------------------------------------- every layout

@pytest.mark.parametrize("fuse", [False, True], ids=["adapter", "fuse"])
@pytest.mark.parametrize("model", ["stock", "fused", "fused+swiglu"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_standard_lora_every_layout_equals_stock_peft(base, inputs, refs, layout, model, fuse):
    ref, sd = _case(refs, layout)
    assert detect_lora_layout(sd) == layout
    target = _target(base, model != "stock", model == "fused+swiglu")
    load_lora(target, sd, fuse=fuse)
    assert_close(run(target, inputs), ref, TOL, f"{layout} on {model}")
    if not fuse and model == "fused+swiglu":  # gate_layer + proj became one block-diagonal LoRA on gate_up
        gu = target.transformer_blocks[0].img_mlp.gate_up
        assert gu.lora_A["default"].weight.shape == (2 * R, 64)
        assert gu._qwen_fused_block_mask["default"].sum() == 2 * 192 * R


def test_kohya_names_map_back_without_diffusers_conversion(refs):
    """kohya's flattened 2.1 names (diffusers' own conversion breaks `img_mlp_gate_layer`, `modulation_1`,
    `txt_in_in_layer`) map back from the family's module names, also with no model (convert_lora)."""
    _, sd = _case(refs, "kohya")
    names = set(parse_lora(sd).modules)
    for want in ("transformer_blocks.1.img_mlp.gate_layer", "transformer_blocks.0.img_mlp.proj", "modulation.1",
                 "txt_in.in_layer", "img_in", "time_text_embed.timestep_embedder.linear_1",
                 "transformer_blocks.0.attn.to_out.0"):
        assert want in names
    assert len(names) == len(sd) // 3  # every module's down/up/alpha understood, nothing dropped


# ------------------------------------------------------------------------------------------ merged <-> standard

def _factors(sd):
    return {n: (f.a, f.b, f.scale) for n, f in parse_lora(sd).modules.items()}


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "diffsynth", "comfyui"])
def test_merged_layout_converts_exactly_and_loads(base, inputs, refs, layout):
    ref, sd = _case(refs, layout)
    merged = convert_lora(sd, "merged")
    names = set(parse_lora(merged).modules)
    assert "transformer_blocks.0.attn.to_qkv" in names and "transformer_blocks.0.attn.to_q" not in names
    assert "transformer_blocks.0.img_mlp.gate_layer" in names  # the merged layout merges q/k/v only
    back = _factors(convert_lora(merged, "standard"))
    orig = _factors(sd)
    assert back.keys() == orig.keys()
    for name, (a, b, s) in orig.items():  # standard -> merged -> standard: the same factors, bit for bit
        assert torch.equal(back[name][0], a) and torch.equal(back[name][1], b) and back[name][2] == s, name
    assert _factors(convert_lora(convert_lora(merged, "standard"), "merged")).keys() == _factors(merged).keys()
    for model in ("stock", "fused"):
        for fuse in (False, True):
            target = _target(base, model == "fused")
            load_lora(target, merged, fuse=fuse)
            assert_close(run(target, inputs), ref, TOL, f"merged {layout} on {model} fuse={fuse}")


def _gate_up_file(peft_sd, alpha):
    """ComfyUI's merged MLP LoRA from stock gate_layer/proj factors: A stacked, B block-diagonal, gate rows first."""
    out = {}
    for i in range(2):
        p = f"transformer_blocks.{i}.img_mlp"
        ga, gb = peft_sd[f"{p}.gate_layer.lora_A.weight"], peft_sd[f"{p}.gate_layer.lora_B.weight"]
        ua, ub = peft_sd[f"{p}.proj.lora_A.weight"], peft_sd[f"{p}.proj.lora_B.weight"]
        out[f"diffusion_model.{p}.gate_up.lora_down.weight"] = torch.cat([ga, ua])
        out[f"diffusion_model.{p}.gate_up.lora_up.weight"] = torch.block_diag(gb, ub)
        out[f"diffusion_model.{p}.gate_up.alpha"] = torch.tensor(float(2 * alpha))  # rank 2R, same scale
    return out


@pytest.mark.parametrize("model", ["stock", "fused", "fused+swiglu"])
def test_comfyui_gate_up_lora_equals_stock(base, inputs, model):
    alpha = 1.5 * R
    stock = stock_peft(base, alpha, targets=["img_mlp.gate_layer", "img_mlp.proj"])
    ref, sd = run(stock, inputs), _gate_up_file(peft_state_dict(stock), alpha)
    assert detect_lora_layout(sd) == "comfyui"
    std = convert_lora(sd, "standard")  # splits gate_up exactly into the stock parts' own factors
    orig = _factors(write(peft_state_dict(stock), "comfyui", alpha))
    assert _factors(std).keys() == orig.keys()
    for name, (a, b, s) in orig.items():
        got = _factors(std)[name]
        assert torch.equal(got[0], a) and torch.equal(got[1], b) and got[2] == s, name
    for fuse in (False, True):
        target = _target(base, model != "stock", model == "fused+swiglu")
        load_lora(target, sd, fuse=fuse)
        assert_close(run(target, inputs), ref, TOL, f"gate_up on {model} fuse={fuse}")


def test_shared_a_gate_up_lora_on_stock_equals_peft_on_merged_mlp(base, inputs):
    """A gate_up LoRA trained as one module (shared A, full B) on a stock model: both parts share A, B split by
    rows; the reference is peft's own adapter on the merged MLP's gate_up."""
    from peft import LoraConfig

    ref_model = qwen_fused.fuse_swiglu(copy.deepcopy(base))
    torch.manual_seed(3)
    ref_model.add_adapter(LoraConfig(r=R, lora_alpha=R, target_modules=["gate_up"], init_lora_weights=False))
    sd = {f"transformer.{k}": v for k, v in peft_state_dict(ref_model).items()}
    ref = run(ref_model, inputs)
    for model in ("stock", "fused"):
        target = _target(base, model == "fused")
        load_lora(target, sd)
        assert "gate_up" not in str(target.transformer_blocks[0].img_mlp)  # split onto the stock parts
        assert_close(run(target, inputs), ref, TOL, f"shared-A gate_up on {model}")


def test_save_from_merged_mlp_loads_in_stock_diffusers(base, inputs, refs, tmp_path):
    """An adapter on a fused model with a merged MLP saves in the standard layout (gate_layer/proj, to_q/k/v) that
    stock diffusers loads into the same model."""
    ref, sd = _case(refs, "diffusers")
    model = _target(base, True, True)
    load_lora(model, sd)
    save_lora(model, tmp_path / "l.safetensors")
    stock = copy.deepcopy(base)
    stock.load_lora_adapter(str(tmp_path / "l.safetensors"), prefix="transformer")
    assert_close(run(stock, inputs), ref, TOL, "saved from merged MLP, loaded by stock diffusers")


# ------------------------------------------------------------------------------------------ diffusers' own API

def test_diffusers_load_lora_adapter_on_fused_equals_stock(base, inputs, refs):
    ref, sd = _case(refs, "diffusers")
    outs = {}
    for model in ("stock", "fused"):
        target = _target(base, model == "fused")
        target.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="style")
        outs[model] = run(target, inputs)
        if model == "fused":
            assert target.transformer_blocks[0].attn.to_qkv.lora_A["style"].weight.shape == (3 * R, 64)
    assert_close(outs["stock"], ref, TOL, "stock load_lora_adapter")
    assert_close(outs["fused"], outs["stock"], TOL, "fused load_lora_adapter")


def test_pipeline_load_lora_weights_on_fused_equals_stock(base, inputs, refs):
    """`QwenImage21Pipeline.load_lora_weights` (QwenImageLoraLoaderMixin) on a pipeline holding a fused
    transformer (the transformer is all it needs)."""
    from diffusers import QwenImage21Pipeline
    from test_qwenimage21 import _StubProcessor

    ref, sd = _case(refs, "diffusers")
    outs = {}
    for model in ("stock", "fused"):
        pipe = QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=None, processor=_StubProcessor(),
                                   transformer=_target(base, False))
        if model == "fused":
            qwen_fused.fuse_qkv(pipe)
        pipe.load_lora_weights(dict(sd))
        outs[model] = run(pipe.transformer, inputs)
    assert_close(outs["stock"], ref, TOL, "stock pipeline")
    assert_close(outs["fused"], outs["stock"], TOL, "fused pipeline")


# ------------------------------------------------------------------------------------------------------ errors

def _untouched(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model", ["stock", "fused", "fused+swiglu"])
def test_keys_that_match_no_module_raise(base, refs, model):
    _, sd = _case(refs, "kohya")
    target = _target(base, model != "stock", model == "fused+swiglu")
    before = _untouched(target)
    bad_kohya = {**sd, "lora_unet_transformer_blocks_0_img_mlp_gate_layr.lora_down.weight": torch.zeros(R, 64),
                 "lora_unet_transformer_blocks_0_img_mlp_gate_layr.lora_up.weight": torch.zeros(192, R)}
    with pytest.raises(ValueError, match="no Qwen-Image module is named 'transformer_blocks_0_img_mlp_gate_layr'"):
        load_lora(target, bad_kohya)
    _, dsd = _case(refs, "diffusers")
    for key in ("transformer.transformer_blocks.7.img_mlp.proj", "transformer.transformer_blocks.0.img_mlp.up"):
        bad = {**dsd, f"{key}.lora_A.weight": torch.zeros(R, 64), f"{key}.lora_B.weight": torch.zeros(192, R)}
        with pytest.raises(ValueError, match=r"1 LoRA modules match no module of this transformer: "
                                             + key.removeprefix("transformer.")):
            load_lora(target, bad, fuse=True)
    bad = {"diffusion_model.transformer_blocks.0.img_mlp.gate_up.lora_down.weight": torch.zeros(R, 64),
           "diffusion_model.transformer_blocks.0.img_mlp.gate_up.lora_up.weight": torch.zeros(191, R)}
    with pytest.raises(ValueError, match="gate_up.*need \\[out 191, in 64\\] but the module is \\[out 384"):
        load_lora(target, bad)
    after = _untouched(target)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(target, "peft_config") or not target.peft_config


def test_peft_apis_refuse_parts_of_a_merged_mlp(base, refs):
    """diffusers' loader and peft's add_adapter would find no gate_layer/proj in a merged MLP and drop them (with
    a warning at most): both raise, naming load_lora; the model is left as it was."""
    from peft import LoraConfig

    _, sd = _case(refs, "diffusers")
    for fused in (False, True):
        model = _target(base, fused, swiglu=True)
        before = _untouched(model)
        with pytest.raises(ValueError, match="add_lora / add_adapter cannot map LoRA targets "
                                             "transformer_blocks.0.img_mlp.gate_layer.*qwen_fused.load_lora"):
            qwen_fused.add_lora(model, LoraConfig(r=R, target_modules=["to_q", "gate_layer"]))
        if fused:  # the bound diffusers API of a fused model
            with pytest.raises(ValueError, match="load_lora_adapter cannot map LoRA targets .*img_mlp.gate_layer"):
                model.load_lora_adapter(dict(sd), prefix="transformer")
            with pytest.raises(ValueError, match="add_adapter cannot map"):
                model.add_adapter(LoraConfig(r=R, target_modules=["img_mlp.proj"]))
        after = _untouched(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert not getattr(model, "peft_config", None)
