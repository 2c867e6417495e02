"""LoRA on a fused model behaves exactly as on stock wherever diffusers or peft define the behaviour (issue 19).

Every test runs the same public call on the stock diffusers model and on a fused copy, from the same random state,
and compares what a user can see: outputs and gradients, saved files (keys, shapes, dtypes, values), the random
stream afterwards, logged warnings and raised errors.
"""
import contextlib
import copy
import logging
import math

import pytest
import torch
from diffusers import QwenImageEditPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from helpers import assert_close, merged_view, tiny_inputs, tiny_transformer

import qwen_fused
from qwen_fused.names import STANDARD

QKV = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
# per-part ranks and alphas with one scale per q/k/v group (what one merged adapter can train), plus other targets
CFG = dict(r=4, lora_alpha=8, target_modules=QKV + ["to_out.0", "img_mlp.net.2"], init_lora_weights=False,
           rank_pattern={"to_k": 2, "add_v_proj": 2}, alpha_pattern={"to_k": 4.0, "add_v_proj": 4.0, "to_out.0": 1.0})
FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs(batch=2, txt_len=7, img_shapes=((1, 4, 4),), valid_lens=(7, 5))


def run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).sample


def pair(base):
    """(stock, fused) copies of `base`."""
    return copy.deepcopy(base), qwen_fused.fuse_qkv(copy.deepcopy(base))


def quiet(model, fn):
    """`fn(model)`, without the fused model's one-line note that q/k/v map onto the merged projections."""
    with pytest.warns(UserWarning, match="mapped to the merged") if qwen_fused.is_fused(model) else \
            contextlib.nullcontext():
        return fn(model)


def same_files(a, b):
    """Two safetensors files hold the same keys, shapes, dtypes and values (bit for bit)."""
    a, b = load_file(a), load_file(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{k} differs"


def add_both(base, seed=0, **cfg):
    """The same `add_adapter` call from the same random state on stock and fused; the stream after it must agree."""
    models, after = pair(base), []
    for model in models:
        torch.manual_seed(seed)
        quiet(model, lambda m: m.add_adapter(LoraConfig(**{**CFG, **cfg})))
        after.append(torch.rand(4))
    assert torch.equal(*after), "the random stream after add_adapter differs from stock's"
    return models


def base_weights(model):
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    return sd if qwen_fused.is_fused(model) else merged_view(sd)


def part_of(fused, stock_name, adapter="default"):
    """`(layer, rows, cols)` of stock module `stock_name`'s factors in the fused model (cols: its rank columns)."""
    attn, _, leaf = stock_name.rpartition(".")
    if leaf not in STANDARD:
        return fused.get_submodule(stock_name), slice(None), slice(None)
    merged, i = STANDARD[leaf]
    layer = fused.get_submodule(f"{attn}.{merged}")
    n = layer.base_layer.out_features // 3
    cols = layer._qwen_fused_block_mask[adapter][i * n].nonzero().flatten()
    return layer, slice(i * n, (i + 1) * n), cols


# ---- 1. random inits: peft's, per part, value for value ---------------------------------------------------------

INITS = [True, False, "gaussian", "pissa", "pissa_niter_2", "olora", "orthogonal"]


@pytest.mark.parametrize("init", INITS, ids=str)
def test_every_per_module_init_is_stocks_value_for_value(base, inputs, init, tmp_path):
    """peft draws each module's factors from the global stream in module order (and PiSSA / OLoRA replace the base
    weight by what the factors leave over): the fused model gets the same numbers for every q/k/v part."""
    stock, fused = add_both(base, init_lora_weights=init)
    for model, where in ((stock, "stock"), (fused, "fused")):
        model.save_lora_adapter(tmp_path / where)
    same_files(tmp_path / "stock" / FILE, tmp_path / "fused" / FILE)
    ws, wf = base_weights(stock), base_weights(fused)
    assert sorted(ws) == sorted(wf) and all(torch.equal(ws[k], wf[k]) for k in ws), "base weights differ"
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, f"init {init}")
    assert_close(run(fused, inputs, attention_kwargs={"scale": 0.5}),
                 run(stock, inputs, attention_kwargs={"scale": 0.5}), 1e-5, f"init {init}, scale 0.5")


@pytest.mark.parametrize("cfg", [
    dict(target_modules=["to_q", "to_v", "add_k_proj"]),  # some parts of a projection
    dict(target_modules=["to_q", "to_k", "to_v", "to_out.0"], layers_to_transform=[1], layers_pattern="transformer_blocks"),
    dict(target_modules=QKV[:4], exclude_modules=["transformer_blocks.1.attn.add_q_proj"], use_rslora=True,
         lora_bias=True, init_lora_weights=True),
    dict(target_modules="all-linear"),  # peft's shorthand: every nn.Linear of the stock model, q/k/v parts included
    # a regex selects on the stock model: these also match the fused model's add_qkv_proj / to_qkv themselves
    dict(target_modules=r".*\.attn\.add_.*"), dict(target_modules=r".*\.attn\.to_[qkv].*"),
], ids=["some-parts", "layers_to_transform", "exclude-rslora-bias", "all-linear", "regex-add", "regex-to"])
def test_target_selection_and_options_are_stocks_value_for_value(base, inputs, cfg, tmp_path):
    stock, fused = add_both(base, rank_pattern={}, alpha_pattern={}, **cfg)
    for model, where in ((stock, "stock"), (fused, "fused")):
        model.save_lora_adapter(tmp_path / where)
    same_files(tmp_path / "stock" / FILE, tmp_path / "fused" / FILE)
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, str(cfg))


def test_merged_module_and_its_parts_in_one_list_raise(base):
    """A list naming the merged module and its parts would put two LoRAs on one projection: an error, nothing added."""
    fused = qwen_fused.fuse_qkv(copy.deepcopy(base))
    with pytest.raises(ValueError, match="selects transformer_blocks.0.attn.to_qkv both itself and through its parts"):
        fused.add_adapter(LoraConfig(r=2, target_modules=["to_qkv", "to_q"]))
    assert not getattr(fused, "peft_config", None)


def test_loftq_init_is_stocks(base, tmp_path):
    """LoftQ (peft's own per-module init, over the part's weight) gives the stock factors and base weights. peft's
    LoftQ needs scipy (its LoraConfig refuses the init without it)."""
    pytest.importorskip("scipy")
    from peft import LoftQConfig

    cfg = dict(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4), rank_pattern={}, alpha_pattern={})
    stock, fused = add_both(base, **cfg)
    for model, where in ((stock, "stock"), (fused, "fused")):
        model.save_lora_adapter(tmp_path / where)
    same_files(tmp_path / "stock" / FILE, tmp_path / "fused" / FILE)
    ws, wf = base_weights(stock), base_weights(fused)
    assert all(torch.equal(ws[k], wf[k]) for k in ws)


def test_random_b_has_each_parts_distribution(base):
    """init_lora_weights=False: nn.Linear's default init, B ~ U(-1/sqrt(r), 1/sqrt(r)) with the part's own rank r
    (not the merged rank r_q + r_k + r_v, which made the fused LoRA ~0.6x as strong)."""
    stock, fused = add_both(base)
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                 "transformer_blocks.1.attn.add_v_proj"):
        layer, rows, cols = part_of(fused, name)
        b = layer.lora_B["default"].weight.detach()[rows][:, cols]
        r = stock.get_submodule(name).r["default"]
        assert b.shape[1] == r
        bound = 1 / math.sqrt(r)
        assert b.abs().max() <= bound and b.abs().max() > 0.9 * bound, (name, r, b.abs().max())
        assert abs(b.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # U(-c, c) has std c / sqrt(3)
        assert torch.equal(b, stock.get_submodule(name).lora_B["default"].weight.detach())


def test_weighted_adapters_match_stock(base, inputs):
    models = pair(base)
    for model in models:
        for seed, name in ((0, "a"), (1, "b")):
            torch.manual_seed(seed)
            quiet(model, lambda m: m.add_adapter(LoraConfig(**CFG), adapter_name=name))
        model.set_adapters(["a", "b"], [0.5, -0.8])
    stock, fused = models
    ref = run(stock, inputs)
    assert_close(run(fused, inputs), ref, 1e-5, "weighted set_adapters")
    stock.set_adapters(["a", "b"], [0.5, 0.8])
    assert (run(stock, inputs) - ref).abs().max() > 1e-3 * ref.abs().max(), "the weights must matter"


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga", "mica"])
def test_inits_that_cannot_be_per_part_raise(base, init):
    """EVA, CorDA and LoRA-GA use statistics peft gathers per stock module from data; MiCA is a LoRA variant chosen
    by the init. None can be built per q/k/v part of a merged projection: a clear error, nothing changed."""
    fused = qwen_fused.fuse_qkv(copy.deepcopy(base))
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    config = LoraConfig(**{**CFG, "init_lora_weights": init})
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' cannot be built per q/k/v part"):
        fused.add_adapter(config)
    assert not getattr(fused, "peft_config", {})
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())


# ---- 2. pipe.save_lora_weights: whatever stock accepts, with the same files -------------------------------------

def test_pipeline_save_lora_weights_pickle_and_errors_match_stock(base, tmp_path):
    stock, fused = add_both(base)
    for model, where in ((stock, "stock"), (fused, "fused")):
        QwenImageEditPipeline.save_lora_weights(tmp_path / where, transformer_lora_layers=get_peft_model_state_dict(
            model), safe_serialization=False)
    got = torch.load(tmp_path / "fused" / "pytorch_lora_weights.bin", weights_only=True)
    ref = torch.load(tmp_path / "stock" / "pytorch_lora_weights.bin", weights_only=True)
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    errors = []
    for model in (stock, fused):  # stock refuses metadata in a pickle file: so does the fused model, in its words
        with pytest.raises(ValueError) as e:
            QwenImageEditPipeline.save_lora_weights(
                tmp_path / "x", transformer_lora_layers=get_peft_model_state_dict(model), safe_serialization=False,
                transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "safe_serialization" in errors[0]
    for model, where in ((stock, "s2"), (fused, "f2")):  # safetensors without metadata: the same file too
        QwenImageEditPipeline.save_lora_weights(tmp_path / where,
                                                transformer_lora_layers=get_peft_model_state_dict(model))
    same_files(tmp_path / "s2" / FILE, tmp_path / "f2" / FILE)


def test_save_lora_adapter_upcast_matches_stock(base, tmp_path):
    """`save_lora_adapter(upcast_before_saving=True)` of a bf16 model: fp32 files with the stock values, and the
    model cast to fp32 afterwards, as diffusers does it."""
    stock, fused = add_both(copy.deepcopy(base).to(torch.bfloat16))
    for model, where in ((stock, "stock"), (fused, "fused")):
        model.save_lora_adapter(tmp_path / where, upcast_before_saving=True)
        assert next(model.parameters()).dtype == torch.float32
    same_files(tmp_path / "stock" / FILE, tmp_path / "fused" / FILE)
    assert load_file(tmp_path / "fused" / FILE)["transformer_blocks.0.attn.to_q.lora_A.weight"].dtype == torch.float32


# ---- 3. missing and unexpected keys through diffusers' API: stock's warnings, stock's modules -------------------

@contextlib.contextmanager
def diffusers_log():
    """The messages diffusers logs (its loggers do not propagate to the root logger)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def incomplete_loras(base):
    stock = copy.deepcopy(base)
    torch.manual_seed(5)
    stock.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=QKV + ["to_out.0"], init_lora_weights=False))
    sd = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(stock).items()}
    drop = lambda key: {k: v for k, v in sd.items() if k != key}  # noqa: E731
    return {"missing_B": drop("transformer.transformer_blocks.0.attn.to_q.lora_B.weight"),
            "missing_A": drop("transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight"),
            "unexpected": {**sd, "transformer.transformer_blocks.0.attn.to_v.lora_A.diffusers_cat": torch.ones(3),
                           "transformer.transformer_blocks.0.attn.to_k.lora_X.weight": torch.ones(2, 2)}}


@pytest.mark.parametrize("case", ["missing_B", "missing_A", "unexpected"])
def test_incomplete_lora_loads_and_warns_as_stock(base, inputs, case):
    """A missing A stays at peft's random init (the same numbers, drawn in stock order), a missing B at zero;
    keys peft does not load are left out; the warning is stock's, word for word."""
    sd = incomplete_loras(base)[case]
    outs, logs, after = [], [], []
    for model in pair(base):
        torch.manual_seed(1)
        with diffusers_log() as records:
            model.load_lora_adapter(dict(sd), adapter_name="x")
        after.append(torch.rand(4))
        outs.append(run(model, inputs))
        logs.append(records)
    assert logs[0] == logs[1] and len(logs[0]) == 1 and ("missing" in case) == ("missing keys" in logs[0][0])
    assert torch.equal(*after)
    assert_close(outs[1], outs[0], 1e-5, case)
    # qwen_fused.load_lora stays strict: every key must land somewhere
    with pytest.raises(ValueError, match="missing A or B|not LoRA tensors of a Qwen-Image module"):
        qwen_fused.load_lora(qwen_fused.fuse_qkv(copy.deepcopy(base)), sd)


def test_incomplete_lora_through_the_pipeline_matches_stock(base, inputs, tmp_path):
    """`pipe.load_lora_weights` (diffusers' Qwen loader, then `load_lora_adapter`) on a file lacking one B."""
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file(incomplete_loras(base)["missing_B"], str(path))
    outs = []
    for model in pair(base):
        torch.manual_seed(1)
        QwenImageEditPipeline.load_lora_into_transformer(load_file(path), transformer=model, adapter_name="x")
        outs.append(run(model, inputs))
    assert_close(outs[1], outs[0], 1e-5, "load_lora_into_transformer, missing B")


# ---- 4. fp8-stored factors under layerwise casting -----------------------------------------------------------------

# user patterns: diffusers then casts the peft layers too (its default skips them)
SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


def test_fp8_stored_lora_factors_match_stock(base, inputs, tmp_path):
    stock, fused = add_both(base)
    for model in (stock, fused):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                                       skip_modules_pattern=SKIP)
    assert fused.transformer_blocks[0].attn.to_qkv.lora_B["default"].weight.dtype == torch.float8_e4m3fn
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, "fp8-stored LoRA factors")
    for model, where in ((stock, "stock"), (fused, "fused")):
        model.save_lora_adapter(tmp_path / where)
    same_files(tmp_path / "stock" / FILE, tmp_path / "fused" / FILE)  # fp8 tensors, bit for bit
    # the fp8 file, loaded (with its per-part scales folded exactly) onto unfused and fused models
    sd = load_file(tmp_path / "stock" / FILE)
    assert sd["transformer_blocks.0.attn.to_k.lora_A.weight"].dtype == torch.float8_e4m3fn
    loaded = []
    for model in pair(base):
        model.load_lora_adapter(tmp_path / "stock", weight_name=FILE, prefix=None)
        loaded.append(run(model, inputs))
    assert_close(loaded[1], loaded[0], 1e-5, "fp8 LoRA file")
    # loaded after the casting was enabled, peft's new layers get fp8 weights without hooks: stock fails in peft's
    # forward, and so does the fused model, with the same error
    errors = []
    for model in pair(base):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                                       skip_modules_pattern=SKIP)
        model.load_lora_adapter(sd, prefix=None)
        with pytest.raises(Exception) as e:
            run(model, inputs)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]


# ---- 5. DoRA: the merged projection with block-diagonal B is three DoRA layers ------------------------------------

DORA = dict(use_dora=True, target_modules=QKV + ["to_out.0"])


def grads(model, inputs):
    out = model(**inputs).sample
    out.mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach()


def test_dora_forward_and_every_gradient_match_stock(base):
    stock, fused = add_both(base, **DORA)
    kw = tiny_inputs(batch=2, txt_len=7, img_shapes=((1, 4, 4),), valid_lens=(7, 5), requires_grad=True)
    kw2 = {k: (v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v) for k, v in kw.items()}
    assert_close(grads(fused, kw2), grads(stock, kw), 1e-5, "DoRA forward")
    for k in ("hidden_states", "encoder_hidden_states"):
        assert_close(kw2[k].grad, kw[k].grad, 1e-5, f"DoRA d{k}")
    checked = 0
    for name, p in stock.named_parameters():
        if not p.requires_grad:
            continue
        stem, _, leaf = name.partition(".lora_")
        layer, rows, cols = part_of(fused, stem)
        kind = leaf.split(".")[0]
        got = layer.get_parameter(f"lora_{leaf}").grad
        got = got[cols] if kind == "A" else got[rows][:, cols] if kind == "B" else got[rows]
        assert_close(got, p.grad, 1e-5, f"DoRA d{name}")
        checked += 1
    assert checked == len([p for p in stock.parameters() if p.requires_grad]) > 0
    b = fused.transformer_blocks[0].attn.to_qkv.lora_B["default"].weight
    mask = fused.transformer_blocks[0].attn.to_qkv._qwen_fused_block_mask["default"]
    assert not b.grad[mask == 0].any(), "off-diagonal blocks of B must get no gradient"


def test_dora_saves_and_loads_in_the_standard_layout(base, inputs, tmp_path):
    stock, fused = add_both(base, **DORA)
    for model, where in ((stock, "stock"), (fused, "fused")):
        model.save_lora_adapter(tmp_path / where)
    same_files(tmp_path / "stock" / FILE, tmp_path / "fused" / FILE)
    assert "transformer_blocks.0.attn.to_k.lora_magnitude_vector" in load_file(tmp_path / "fused" / FILE)
    ref = run(stock, inputs)
    assert_close(run(fused, inputs), ref, 1e-5, "DoRA added")
    for source in ("stock", "fused"):  # each file on a fresh stock and a fresh fused model
        for model in pair(base):
            model.load_lora_adapter(tmp_path / source, weight_name=FILE, prefix=None)
            assert_close(run(model, inputs), ref, 1e-5, f"DoRA file from {source}")
    for model in pair(base):  # qwen_fused's own loader and writer read and write it too
        qwen_fused.load_lora(model, tmp_path / "stock" / FILE)
        assert_close(run(model, inputs), ref, 1e-5, "DoRA through qwen_fused.load_lora")
    qwen_fused.save_lora(fused, tmp_path / "ours.safetensors")
    model = copy.deepcopy(base)
    model.load_lora_adapter(tmp_path, weight_name="ours.safetensors")  # diffusers layout: `transformer.` keys
    assert_close(run(model, inputs), ref, 1e-5, "qwen_fused.save_lora DoRA file on stock")
    # merged into the weights by peft (fuse_lora), and back
    for model in (stock, fused):
        model.fuse_lora(lora_scale=0.6)
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, "DoRA fuse_lora")
    for model in (stock, fused):
        model.unfuse_lora()
    assert_close(run(fused, inputs), run(stock, inputs), 1e-5, "DoRA unfuse_lora")


def test_dora_that_cannot_be_one_merged_layer_raises(base, tmp_path):
    fused = qwen_fused.fuse_qkv(copy.deepcopy(base))
    with pytest.raises(ValueError, match="DoRA on only some q/k/v parts"):
        fused.add_adapter(LoraConfig(**{**CFG, "use_dora": True, "target_modules": ["to_q", "to_k"]}))
    stock = copy.deepcopy(base)
    stock.add_adapter(LoraConfig(**{**CFG, "use_dora": True, "target_modules": ["to_q", "to_k"]}))
    stock.save_lora_adapter(tmp_path)
    with pytest.raises(ValueError, match="DoRA on only some of its q/k/v parts"):
        fused.load_lora_adapter(tmp_path, weight_name=FILE, prefix=None)
    with pytest.raises(ValueError, match="DoRA adapter cannot be added into the base weights"):
        qwen_fused.load_lora(fused, tmp_path / FILE, fuse=True)
    assert not getattr(fused, "peft_config", {})


# ---- 6. the rest of diffusers' LoRA API -----------------------------------------------------------------------

def state_dicts(base, ranks=(4, 4, 2)):
    out = []
    for seed, r in enumerate(ranks):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=r, lora_alpha=8, target_modules=QKV + ["to_out.0"], init_lora_weights=False))
        out.append({f"transformer.{k}": v for k, v in get_peft_model_state_dict(model).items()})
    return out


def same_calls(base, inputs, calls, what):
    outs = []
    for model in pair(base):
        outs.append(calls(model))
    if torch.is_tensor(outs[0]):
        assert_close(outs[1], outs[0], 1e-5, what)
    else:
        assert outs[1] == outs[0], what
    return outs[0]


def test_hotswap_and_adapter_api_match_stock(base, inputs):
    a, b, small = state_dicts(base)

    def hotswap(m):
        m.load_lora_adapter(a, adapter_name="x")
        m.load_lora_adapter(b, adapter_name="x", hotswap=True)
        return run(m, inputs)

    def hotswap_smaller_rank(m):  # enable_lora_hotswap pads to a target rank; a rank-2 LoRA then swaps in
        m.enable_lora_hotswap(target_rank=8)
        m.load_lora_adapter(a, adapter_name="x")
        m.load_lora_adapter(small, adapter_name="x", hotswap=True)
        return run(m, inputs)

    def low_cpu_mem(m):
        m.load_lora_adapter(a, adapter_name="x", low_cpu_mem_usage=True)
        return run(m, inputs)

    def toggles(m):
        m.load_lora_adapter(a, adapter_name="x")
        m.disable_lora()
        off = run(m, inputs)
        m.enable_lora()
        return torch.cat([off, run(m, inputs)])

    def per_block_weights(m):
        m.load_lora_adapter(a, adapter_name="x")
        m.load_lora_adapter(b, adapter_name="y")
        m.set_adapters(["x", "y"], weights=[{"transformer_blocks.0": 0.3, "transformer_blocks.1": 0.9}, 0.5])
        return run(m, inputs)

    def fuse_unfuse(m):
        m.load_lora_adapter(a, adapter_name="x")
        m.load_lora_adapter(b, adapter_name="y")
        m.fuse_lora(lora_scale=0.7, adapter_names=["x"])
        fused = run(m, inputs)
        m.unfuse_lora()
        return torch.cat([fused, run(m, inputs)])

    def listing(m):
        m.load_lora_adapter(a, adapter_name="x")
        m.load_lora_adapter(b, adapter_name="y")
        m.set_adapters("y")
        return m.active_adapters(), sorted(m.peft_config)

    plain = run(base, inputs)
    for calls in (hotswap, hotswap_smaller_rank, low_cpu_mem, toggles, per_block_weights, fuse_unfuse):
        out = same_calls(base, inputs, calls, calls.__name__)
        assert (out[-plain.shape[0]:] - plain).abs().max() > 1e-3 * plain.abs().max(), calls.__name__
    assert same_calls(base, inputs, listing, "active_adapters") == (["y"], ["x", "y"])


def test_hotswap_of_an_incompatible_config_raises_as_stock(base):
    a, b, _ = state_dicts(base)
    errors = []
    for model in pair(base):
        model.load_lora_adapter(a, adapter_name="x")
        bare = {k.removeprefix("transformer."): v for k, v in b.items()}
        with pytest.raises(ValueError) as e:
            model.load_lora_adapter(bare, prefix=None, adapter_name="x", hotswap=True, metadata={
                "r": 4, "lora_alpha": 8, "target_modules": QKV + ["to_out.0"], "use_rslora": True})
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "use_rslora" in errors[0]
