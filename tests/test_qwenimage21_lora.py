"""LoRA on Qwen-Image 2.1 (issue 20, item 4): every layout `load_lora` reads, on stock and fused 2.1 models.

The reference is always stock diffusers + peft: a stock peft adapter on the stock tiny 2.1 transformer, on every
kind of Linear the model has (attention, SwiGLU parts, modulation, txt_in/img_in, time embedding, output). Its
state dict is written in each layout by hand here (not by qwen_fused's writer), loaded onto a stock and a fused
model (as an adapter and with fuse=True), and must give stock's output (fp32, 1e-5 relative). Merged <-> standard
conversion is exact both ways; ComfyUI's merged `img_mlp.gate_up` (gate rows first) loads onto stock, fused and
merged-MLP models; `gate_layer`/`proj` LoRAs map onto a merged MLP's `gate_up`; diffusers' own LoRA API on a fused
model gives stock's output; keys that match no module raise. On a merged MLP (fuse_swiglu, with or without
fuse_qkv) every LoRA entry point (add_lora, add_adapter, load_lora_adapter, pipe.load_lora_weights) gives stock's
adapter part for part, stock's output, gradients and optimizer step, and saves stock's files.
"""
import contextlib
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


# --------------------------------------------------------------- the LoRA API on a merged MLP, against stock

MLP_VARIANTS = ["swiglu", "qkv+swiglu"]
# the MLP's parts and its output (stock registers proj, out, gate_layer: the order stock peft draws in) and q/k/v
MLP_CFG = dict(r=R, lora_alpha=3, init_lora_weights=False,
               target_modules=["to_q", "to_k", "to_v", "img_mlp.gate_layer", "img_mlp.proj", "img_mlp.out"])
FILE = "pytorch_lora_weights.safetensors"


def _merged_mlp(base, variant):
    return _target(base, variant == "qkv+swiglu", swiglu=True)


def _part(model, name, what=lambda p: p, adapter="default"):
    """`(A, B)` of stock module `name`'s LoRA in `model` (`what` of the parameters: themselves or their grads): its
    rows and rank columns of a merged projection (to_qkv, gate_up), which must be the part's only nonzero block."""
    from qwen_fused.lora.algebra import part_of, row_splits

    try:
        layer = model.get_submodule(name)
    except AttributeError:
        layer = None
    if layer is not None:
        return what(layer.lora_A[adapter].weight), what(layer.lora_B[adapter].weight)
    merged, i, k = part_of(name, row_splits())
    layer = model.get_submodule(merged)
    n = layer.base_layer.out_features // k
    mask = layer._qwen_fused_block_mask[adapter]
    cols = mask[i * n].nonzero().flatten()
    b = what(layer.lora_B[adapter].weight)
    off = b[i * n:(i + 1) * n].clone()
    off[:, cols] = 0
    assert not off.any(), f"{name}: B is nonzero outside its block in {merged}"
    return what(layer.lora_A[adapter].weight)[cols], b[i * n:(i + 1) * n][:, cols]


def _stock_lora_names(stock):
    from peft.tuners.lora import LoraLayer

    return [n for n, m in stock.named_modules() if isinstance(m, LoraLayer)]


def _assert_parts_equal(merged, stock, what=lambda p: p, tol=0.0, label=""):
    names = _stock_lora_names(stock)
    assert any(".img_mlp.gate_layer" in n for n in names) and any(".img_mlp.proj" in n for n in names)
    for name in names:
        for got, want, ab in zip(_part(merged, name, what), _part(stock, name, what), "AB"):
            assert got.shape == want.shape, (name, ab)
            if tol:
                assert_close(got, want, tol, f"{label} {name} {ab}")
            else:
                assert torch.equal(got, want), f"{label} {name} {ab} differs from stock's"


def _loss(out):
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def _train_step_equals_stock(merged, stock, inputs):
    """Forward, every LoRA gradient (per part) and one Adam step: the merged model stays stock's."""
    outs = []
    for model in (merged, stock):
        out = model(**inputs).sample
        _loss(out).backward()
        outs.append(out.detach())
    assert_close(outs[0], outs[1], TOL, "output")
    _assert_parts_equal(merged, stock, lambda p: p.grad, TOL, "grad")
    for model in (merged, stock):
        opt = torch.optim.Adam([p for n, p in model.named_parameters() if ".lora_" in n], lr=1e-2)
        opt.step()
        opt.zero_grad()
    _assert_parts_equal(merged, stock, lambda p: p.detach(), TOL, "after a step")
    assert_close(run(merged, inputs), run(stock, inputs), TOL, "output after a step")


def _same_files(a, b, tol=0.0):
    """Two safetensors files hold the same keys, shapes, dtypes and values (bit for bit; `tol`: within it)."""
    from safetensors.torch import load_file

    a, b = load_file(a), load_file(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if tol:
            assert_close(a[k], b[k], tol, k)
        else:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{k} differs"


def _loads_back(base, variant, inputs, ref, tmp_path):
    for target in (copy.deepcopy(base), _merged_mlp(base, variant)):
        target.load_lora_adapter(tmp_path / "merged", prefix=None, weight_name=FILE)
        assert_close(run(target, inputs), ref, TOL, "saved file loaded back")


def _add_both(base, variant, add, **cfg):
    """The same call from the same random state on a stock model and a merged-MLP one: (merged, stock); the random
    stream after it must agree."""
    from peft import LoraConfig

    models, after = (_merged_mlp(base, variant), copy.deepcopy(base)), []
    for model in models:
        torch.manual_seed(0)
        config = LoraConfig(**{**MLP_CFG, **cfg})
        if model is models[0]:
            with pytest.warns(UserWarning, match="mapped to the merged .*gate_up"):
                add(model, config)
        else:
            model.add_adapter(config)
        after.append(torch.rand(4))
    assert torch.equal(*after), "the random stream after the call differs from stock's"
    return models


ADD = {"add_lora": lambda m, c: qwen_fused.add_lora(m, c), "add_adapter": lambda m, c: m.add_adapter(c)}


@pytest.mark.parametrize("variant", MLP_VARIANTS)
@pytest.mark.parametrize("api", list(ADD))
def test_add_adapter_on_merged_mlp_trains_and_saves_as_stock(base, api, variant, tmp_path):
    """gate_layer/proj targets on a merged MLP: one block-diagonal adapter on gate_up, each part stock's factors
    (same random stream, stock order: proj, out, gate_layer); stock's output, gradients, step and files."""
    merged, stock = _add_both(base, variant, ADD[api])
    gu = merged.transformer_blocks[0].img_mlp.gate_up
    assert gu.lora_A["default"].weight.shape == (2 * R, 64) and "gate_layer" not in str(merged)
    _assert_parts_equal(merged, stock, label="init")
    _assert_saves_as_stock(merged, stock, tmp_path / "init")
    kw = random_inputs(base, text=(3, 2), pad=(0, 1))
    _train_step_equals_stock(merged, stock, kw)
    _assert_saves_as_stock(merged, stock, tmp_path / "trained", TOL)
    _loads_back(base, variant, kw, run(stock, kw), tmp_path / "trained")


def _assert_saves_as_stock(merged, stock, tmp_path, tol=0.0):
    """transformer.save_lora_adapter, pipe.save_lora_weights(get_peft_model_state_dict) and qwen_fused.save_lora:
    stock's files (same keys; values bit for bit, or within `tol` after training: the gradients are stock's only
    to rounding)."""
    from diffusers import QwenImage21Pipeline

    for model, where in ((stock, "stock"), (merged, "merged")):
        model.save_lora_adapter(tmp_path / where)
        QwenImage21Pipeline.save_lora_weights(tmp_path / f"{where}-pipe",
                                              transformer_lora_layers=peft_state_dict(model))
    _same_files(tmp_path / "stock" / FILE, tmp_path / "merged" / FILE, tol)
    _same_files(tmp_path / "stock-pipe" / FILE, tmp_path / "merged-pipe" / FILE, tol)
    save_lora(merged, tmp_path / "ours.safetensors")
    _same_files(tmp_path / "stock-pipe" / FILE, tmp_path / "ours.safetensors", tol)
    if tol:
        return
    pickles = []  # pickle files keep the state dict's order: stock's module order (proj, out, gate_layer)
    for model, where in ((stock, "stock-bin"), (merged, "merged-bin")):
        model.save_lora_adapter(tmp_path / where, safe_serialization=False)
        QwenImage21Pipeline.save_lora_weights(tmp_path / f"{where}-pipe", safe_serialization=False,
                                              transformer_lora_layers=peft_state_dict(model))
        pickles.append([torch.load(tmp_path / w / "pytorch_lora_weights.bin", weights_only=True)
                        for w in (where, f"{where}-pipe")])
    for ref, got in zip(*pickles):
        assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("variant", MLP_VARIANTS)
@pytest.mark.parametrize("init", [True, "gaussian", "pissa", "olora", "orthogonal"], ids=str)
def test_every_per_module_init_on_merged_mlp_is_stocks(base, inputs, init, variant, tmp_path):
    """Every init peft builds per module, for gate_layer/proj as for q/k/v: the same factors (and the base weights
    PiSSA / OLoRA change), output and saved file as stock; DoRA on both parts too."""
    for cfg in (dict(init_lora_weights=init),) + ((dict(use_dora=True),) if init is True else ()):
        merged, stock = _add_both(base, variant, ADD["add_lora"], **cfg)
        _assert_parts_equal(merged, stock, label=str(cfg))
        ws = {k.replace(".base_layer", ""): v for k, v in stock.state_dict().items() if ".lora_" not in k}
        wm = {k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if ".lora_" not in k}
        for i in range(2):
            p = f"transformer_blocks.{i}.img_mlp"
            assert torch.equal(wm[f"{p}.gate_up.weight"],
                               torch.cat([ws[f"{p}.gate_layer.weight"], ws[f"{p}.proj.weight"]])), f"{cfg} base"
        assert_close(run(merged, inputs), run(stock, inputs), TOL, str(cfg))
        for model, where in ((stock, "stock"), (merged, "merged")):
            model.save_lora_adapter(tmp_path / str(cfg) / where)
        _same_files(tmp_path / str(cfg) / "stock" / FILE, tmp_path / str(cfg) / "merged" / FILE)


def _stock_lora_file(base, **cfg):
    """A stock peft LoRA (random A and B) on q/k/v, gate_layer, proj and out, as diffusers' state dict."""
    from peft import LoraConfig

    stock = copy.deepcopy(base)
    torch.manual_seed(7)
    stock.add_adapter(LoraConfig(**{**MLP_CFG, "lora_alpha": 5, **cfg}))
    return {f"transformer.{k}": v for k, v in peft_state_dict(stock).items()}


@pytest.mark.parametrize("variant", MLP_VARIANTS)
@pytest.mark.parametrize("api", ["load_lora_adapter", "pipe.load_lora_weights"])
def test_diffusers_loaders_on_merged_mlp_equal_stock(base, api, variant, tmp_path):
    """diffusers' loaders on a merged MLP (bound by fuse_swiglu, as by fuse_qkv): stock's adapter part for part
    (a factor the file lacks gets stock's init from the same stream), output, gradients, step and saved files."""
    from diffusers import QwenImage21Pipeline
    from test_qwenimage21 import _StubProcessor

    sd = _stock_lora_file(base)
    if api == "load_lora_adapter":  # stock inits what the file lacks (the pipeline loads with low_cpu_mem_usage,
        del sd["transformer.transformer_blocks.1.img_mlp.gate_layer.lora_A.weight"]  # where stock cannot)
    models, after = [], []
    for merged in (True, False):
        model = _merged_mlp(base, variant) if merged else copy.deepcopy(base)
        torch.manual_seed(3)
        if api == "load_lora_adapter":
            model.load_lora_adapter(dict(sd), prefix="transformer", adapter_name="default")
        else:
            QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=None, processor=_StubProcessor(),
                                transformer=model).load_lora_weights(dict(sd), adapter_name="default")
        after.append(torch.rand(4))
        models.append(model)
    assert torch.equal(*after), "the random stream after loading differs from stock's"
    merged, stock = models
    assert merged.transformer_blocks[0].img_mlp.gate_up.lora_A["default"].weight.shape == (2 * R, 64)
    _assert_parts_equal(merged, stock, label=api)
    _assert_saves_as_stock(merged, stock, tmp_path / "init")
    kw = random_inputs(base, text=(3, 2), pad=(0, 1))
    _train_step_equals_stock(merged, stock, kw)
    _assert_saves_as_stock(merged, stock, tmp_path / "trained", TOL)
    _loads_back(base, variant, kw, run(stock, kw), tmp_path / "trained")


def test_unfusing_one_merge_keeps_the_lora_api_for_the_other(base, inputs):
    """fuse_qkv and fuse_swiglu both bind diffusers' LoRA API; undoing one keeps it while the other merge is on."""
    from peft import LoraConfig

    model = _merged_mlp(base, "qkv+swiglu")
    qwen_fused.unfuse_qkv(model)
    assert "add_adapter" in model.__dict__
    stock = copy.deepcopy(base)
    for m in (model, stock):
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="mapped") if m is model else contextlib.nullcontext():
            m.add_adapter(LoraConfig(**MLP_CFG))
    assert_close(run(model, inputs), run(stock, inputs), TOL, "after unfuse_qkv")
    again = qwen_fused.fuse_qkv(_merged_mlp(base, "swiglu"))
    qwen_fused.unfuse_swiglu(again)
    assert "add_adapter" in again.__dict__
    qwen_fused.unfuse_qkv(again)
    assert "add_adapter" not in again.__dict__


def test_merged_mlp_stock_children_are_stocks_order(base):
    mlp = base.transformer_blocks[0].img_mlp
    from qwen_fused.families.qwenimage21_mlp import MergedSwiGLU

    assert MergedSwiGLU.STOCK_CHILDREN == tuple(mlp._modules)


@pytest.mark.filterwarnings("ignore:`init_lora_weights` is 'eva'")
@pytest.mark.parametrize("variant", MLP_VARIANTS)
def test_what_cannot_map_onto_a_merged_mlp_raises(base, variant, tmp_path):
    """DoRA on only one of gate_layer/proj is not one merged DoRA layer, and per-stock-module inits (EVA, ...)
    cannot be built per part: each API raises naming the module and the remedy, and the model is left as it was."""
    from peft import LoraConfig

    model = _merged_mlp(base, variant)
    before = _untouched(model)
    dora = LoraConfig(r=R, target_modules=["img_mlp.gate_layer", "to_out.0"], use_dora=True)
    for add in ADD.values():
        with pytest.raises(ValueError, match=r"DoRA on only some gate_layer/proj parts of transformer_blocks.0.img_mlp.gate_up.*"
                                             r"target all parts .*or add it on the unfused model"):
            add(model, dora)
        with pytest.raises(ValueError, match="init_lora_weights='eva' cannot be built per .*gate_layer/proj part"):
            add(model, LoraConfig(r=R, target_modules=["img_mlp.proj"], init_lora_weights="eva"))
    sd = _stock_lora_file(base, target_modules=["img_mlp.gate_layer"], use_dora=True)
    with pytest.raises(ValueError, match=r"img_mlp.gate_up: DoRA on only some of its parts \(1 of 2\).*load it onto "
                                         r"the unfused model"):
        model.load_lora_adapter(sd, prefix="transformer")
    after = _untouched(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not getattr(model, "peft_config", None)


@pytest.mark.parametrize("variant", MLP_VARIANTS)
def test_regex_targets_on_merged_mlp_select_as_on_stock(base, variant):
    """A regex selects on the stock model: `img_mlp.<anything>` also matches the merged model's own gate_up, which
    stock lacks; the parts map onto it and the result is stock's model."""
    merged, stock = _add_both(base, variant, ADD["add_adapter"], target_modules=r".*\.img_mlp\.(?!activation_fn).*")
    _assert_parts_equal(merged, stock, label="regex")
    kw = random_inputs(base, text=(3, 2), pad=(0, 1))
    assert_close(run(merged, kw), run(stock, kw), TOL, "regex targets")
