"""LoRA on merged QKV: every layout, exact conversion, load/save, peft training, bad input (issue 3).

The reference is always the *stock* diffusers model with the LoRA applied by hand: W + alpha/r * B @ A.
"""
import copy
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import TINY_CFG, assert_close, tiny_transformer

import qwen_fused
from qwen_fused import convert_lora, fuse_qkv, load_lora, save_lora
from qwen_fused.lora import add_lora, detect_lora_layout, parse_lora
from qwen_fused.lora_factors import linear_lora_factors
from qwen_fused.names import STANDARD, STREAMS
from qwen_fused.numerics import rel_err

CFG = TINY_CFG
INNER = 96
QKV = tuple(STANDARD)


@pytest.fixture(scope="module")
def base():
    return tiny_transformer()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    return dict(hidden_states=torch.randn(2, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(2, 7, 24, generator=g),
                encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5, 0.7]), img_shapes=[[(1, 4, 4)]] * 2)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def stock_with_adapter(base, cfg, seed=None):
    """A copy of the stock model with a peft adapter from `cfg` whose B is random (so the LoRA is live)."""
    if seed is not None:
        torch.manual_seed(seed)
    stock = copy.deepcopy(base)
    stock.add_adapter(LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in stock.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return stock


def fresh(base, fused):
    m = copy.deepcopy(base)
    return fuse_qkv(m) if fused else m


# ---- LoRAs written by hand, in each layout (independent of the code under test) ------------------------------

def standard_lora(seed=0, dtype=torch.float32, same_a=False):
    """{module: (A, B, alpha or None)} over q/k/v of both streams (different ranks and alphas) and other modules."""
    g = torch.Generator().manual_seed(seed)
    shapes = {f"transformer_blocks.0.attn.{n}": (INNER, INNER) for n in QKV}
    shapes.update({"transformer_blocks.1.attn.to_k": (INNER, INNER),
                   "transformer_blocks.1.attn.to_out.0": (INNER, INNER),
                   "transformer_blocks.1.attn.to_add_out": (INNER, INNER),
                   "transformer_blocks.0.img_mlp.net.0.proj": (4 * INNER, INNER),
                   "transformer_blocks.1.txt_mod.1": (6 * INNER, INNER), "proj_out": (16, INNER),
                   "img_in": (INNER, 16)})
    lora, shared = {}, None
    for i, (name, (out, inp)) in enumerate(shapes.items()):
        r = 2 + i % 3 if not same_a else 3
        a = torch.randn(r, inp, generator=g, dtype=dtype) * 0.3
        if same_a and inp == INNER:
            shared = a if shared is None else shared
            a = shared
        alpha = None if i % 4 == 3 else float(r + i % 2)
        lora[name] = (a, torch.randn(out, r, generator=g, dtype=dtype) * 0.3, alpha)
    return lora


def merged_lora(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"transformer_blocks.0.attn.to_qkv": (torch.randn(3, INNER, generator=g, dtype=dtype) * 0.3,
                                                 torch.randn(3 * INNER, 3, generator=g, dtype=dtype) * 0.3, 5.0),
            "transformer_blocks.1.attn.add_qkv_proj": (torch.randn(2, INNER, generator=g, dtype=dtype) * 0.3,
                                                       torch.randn(3 * INNER, 2, generator=g, dtype=dtype) * 0.3, None),
            "transformer_blocks.1.img_mlp.net.2": (torch.randn(2, 4 * INNER, generator=g, dtype=dtype) * 0.3,
                                                   torch.randn(INNER, 2, generator=g, dtype=dtype) * 0.3, 1.0)}


def write(lora, layout):
    """Keys of one layout, spelled out literally."""
    sd = {}
    for name, (a, b, alpha) in lora.items():
        if layout == "kohya":
            base, an, bn = "lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up"
        elif layout == "lightning":
            base, an, bn = name, "lora_down", "lora_up"
        elif layout == "comfyui":
            base, an, bn = "diffusion_model." + name, "lora_down", "lora_up"
        else:
            prefixes = {"diffusers": "transformer.", "peft": "", "diffsynth": "", "ai-toolkit": "diffusion_model."}
            base = prefixes[layout] + name
            an, bn = ("lora_A.default", "lora_B.default") if layout == "diffsynth" else ("lora_A", "lora_B")
        sd[f"{base}.{an}.weight"], sd[f"{base}.{bn}.weight"] = a, b
        if alpha is not None:
            sd[f"{base}.alpha"] = torch.tensor(alpha)
    return sd


def standard_deltas(lora):
    """Every LoRA as per-standard-module deltas scale * B @ A (merged entries split by rows)."""
    out = {}
    for name, (a, b, alpha) in lora.items():
        delta = b @ a * (1.0 if alpha is None else alpha / a.shape[0])
        attn, _, leaf = name.rpartition(".")
        if leaf in STREAMS:
            for i, std in enumerate(STREAMS[leaf]):
                out[f"{attn}.{std}"] = out.get(f"{attn}.{std}", 0) + delta[i * INNER:(i + 1) * INNER]
        else:
            out[name] = out.get(name, 0) + delta
    return out


def by_hand(base, *loras_and_scales):
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for lora, scale in loras_and_scales:
            for name, delta in standard_deltas(lora).items():
                ref.get_submodule(name).weight += scale * delta
    return ref


@pytest.fixture(scope="module")
def std_ref(base, inputs):
    return run(by_hand(base, (standard_lora(), 0.7)), inputs)


@pytest.fixture(scope="module")
def merged_ref(base, inputs):
    return run(by_hand(base, (merged_lora(), 1.0)), inputs)


# ---- every layout x fuse x fused model ----------------------------------------------------------------------

LAYOUT_CASES = ["diffusers", "peft", "diffsynth", "ai-toolkit", "comfyui", "kohya", "lightning"]


@pytest.mark.parametrize("layout", LAYOUT_CASES)
def test_layout_detected(layout):
    assert detect_lora_layout(write(standard_lora(), layout)) == layout
    assert detect_lora_layout(write(merged_lora(), layout)) == layout
    assert parse_lora(write(merged_lora(), layout)).form == "merged"


@pytest.mark.parametrize("fused", [False, True], ids=["stock-model", "fused-model"])
@pytest.mark.parametrize("fuse", [False, True], ids=["adapter", "fuse"])
@pytest.mark.parametrize("layout", LAYOUT_CASES)
def test_standard_lora_every_layout(base, inputs, std_ref, layout, fuse, fused):
    lora, ref = standard_lora(), std_ref
    model = fresh(base, fused)
    load_lora(model, write(lora, layout), scale=0.7, fuse=fuse)
    assert_close(run(model, inputs), ref, 1e-5, f"{layout} fuse={fuse} fused={fused}")
    assert fuse != bool(getattr(model, "peft_config", {}))


@pytest.mark.parametrize("fused", [False, True], ids=["stock-model", "fused-model"])
@pytest.mark.parametrize("fuse", [False, True], ids=["adapter", "fuse"])
@pytest.mark.parametrize("layout", ["diffusers", "kohya", "diffsynth"])
def test_merged_lora(base, inputs, merged_ref, layout, fuse, fused):
    lora, ref = merged_lora(), merged_ref
    model = fresh(base, fused)
    load_lora(model, write(lora, layout), fuse=fuse)
    assert_close(run(model, inputs), ref, 1e-5, f"merged {layout} fuse={fuse} fused={fused}")


def test_rank_on_fused_model(base):
    """Standard q/k/v with different A -> rank r_q + r_k + r_v; with identical A -> rank r."""
    model = fresh(base, True)
    lora = standard_lora()
    load_lora(model, write(lora, "peft"))
    attn = model.transformer_blocks[0].attn
    ranks = [lora[f"transformer_blocks.0.attn.{n}"][0].shape[0] for n in ("to_q", "to_k", "to_v")]
    assert attn.to_qkv.lora_A["default"].weight.shape[0] == sum(ranks)
    model = fresh(base, True)
    load_lora(model, write(standard_lora(same_a=True), "peft"))
    assert model.transformer_blocks[0].attn.to_qkv.lora_A["default"].weight.shape[0] == 3


def test_file_and_pipeline(base, inputs, tmp_path):
    lora = standard_lora()
    path = tmp_path / "lora.safetensors"
    save_file(write(lora, "kohya"), str(path))
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, fresh(base, True))
    load_lora(pipe, path, adapter_name="style")
    assert_close(run(pipe.transformer, inputs), run(by_hand(base, (lora, 1.0)), inputs), 1e-5)


# ---- conversion algebra in float64 ---------------------------------------------------------------------------

def deltas_of(sd):
    return standard_deltas({n: (f.a, f.b, f.alpha) for n, f in parse_lora(sd).modules.items()})


def assert_same_deltas(sd, ref_sd, tol=1e-12):
    """Same delta on every module (a merged LoRA over only to_k has exact-zero q and v row blocks)."""
    got, ref = deltas_of(sd), deltas_of(ref_sd)
    assert set(ref) <= set(got)
    for name in got:
        if name in ref:
            assert_close(got[name], ref[name], tol, name)
        else:
            assert not got[name].any(), name


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "diffsynth", "lightning"])
def test_round_trip_standard_merged_standard(layout):
    sd = write(standard_lora(dtype=torch.float64), layout)
    merged = convert_lora(sd, "merged")
    assert detect_lora_layout(merged) == layout
    assert parse_lora(merged).form == "merged"
    assert_same_deltas(merged, sd)
    back = convert_lora(merged, "standard")
    assert_same_deltas(back, sd)
    # block-diagonal B splits back into the original factors: same ranks, A bit-exact
    orig, got = parse_lora(sd).modules, parse_lora(back).modules
    assert sorted(orig) == sorted(got)
    for name in orig:
        assert torch.equal(got[name].a, orig[name].a)
        assert_close(got[name].b * got[name].scale, orig[name].b * orig[name].scale, 1e-15, name)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_round_trip_merged_standard_merged(layout):
    sd = write(merged_lora(dtype=torch.float64), layout)
    std = convert_lora(sd, "standard")
    assert parse_lora(std).form == "standard"
    assert_same_deltas(std, sd)
    again = convert_lora(std, "merged")
    orig, got = parse_lora(sd).modules, parse_lora(again).modules
    for name in orig:  # shared A -> identical A on q/k/v -> rank r again, tensors bit-exact
        assert torch.equal(got[name].a, orig[name].a) and torch.equal(got[name].b, orig[name].b)
        assert got[name].scale == orig[name].scale


def test_conversion_formula():
    """The documented algebra itself: A = cat(A_q, A_k, A_v), B = blockdiag(B_q s_q, B_k s_k, B_v s_v)."""
    lora = standard_lora(dtype=torch.float64)
    merged = parse_lora(convert_lora(write(lora, "peft"), "merged")).modules["transformer_blocks.0.attn.to_qkv"]
    parts = [lora[f"transformer_blocks.0.attn.{n}"] for n in ("to_q", "to_k", "to_v")]
    assert torch.equal(merged.a, torch.cat([a for a, _, _ in parts]))
    scales = [1.0 if al is None else al / a.shape[0] for a, _, al in parts]
    expect = torch.block_diag(*[b * s for (_, b, _), s in zip(parts, scales)]) * (1 / merged.scale)
    assert_close(merged.b, expect, 1e-15)


# ---- several adapters; fallbacks -----------------------------------------------------------------------------

def test_several_adapters(base, inputs):
    l1, l2 = standard_lora(seed=3), merged_lora(seed=4)
    ref = run(by_hand(base, (l1, 0.5), (l2, 1.5)), inputs)
    model = fresh(base, True)
    load_lora(model, write(l1, "kohya"), adapter_name="style")
    load_lora(model, write(l2, "diffusers"), adapter_name="detail")
    model.set_adapters(["style", "detail"], [0.5, 1.5])
    w, b, lora_a, lora_b, s = linear_lora_factors(model.transformer_blocks[0].attn.to_qkv)
    ranks = [l1[f"transformer_blocks.0.attn.{n}"][0].shape[0] for n in ("to_q", "to_k", "to_v")]
    # one adapter: A concatenated (block-diagonal r_q + r_k + r_v, then the merged rank 3), scales folded into B
    assert s == 1.0 and lora_a.shape[0] == sum(ranks) + 3 and lora_b.shape == (3 * INNER, sum(ranks) + 3)
    assert_close(run(model, inputs), ref, 1e-5, "two adapters")
    model.set_adapters(["style"], [0.5])
    assert_close(run(model, inputs), run(by_hand(base, (l1, 0.5)), inputs), 1e-5, "one active")
    model.disable_lora()
    assert_close(run(model, inputs), run(base, inputs), 1e-6, "disabled")


def test_fallback_paths_match_fast_path(base, inputs):
    """Dropout modules, merged adapters and DoRA go through proj(x) + epilogue and still match."""
    lora = standard_lora()
    ref = run(by_hand(base, (lora, 1.0)), inputs)
    model = fresh(base, True)
    load_lora(model, write(lora, "diffusers"))
    for blk in model.transformer_blocks:
        for proj in (blk.attn.to_qkv, blk.attn.add_qkv_proj):
            if hasattr(proj, "lora_dropout"):
                proj.lora_dropout["default"] = torch.nn.Dropout(0.5).eval()  # eval mode: identity, but not expressible
    assert linear_lora_factors(model.transformer_blocks[0].attn.to_qkv) is None
    assert_close(run(model, inputs), ref, 1e-5, "dropout fallback")
    model.fuse_lora()  # peft merged state: the base layer alone
    assert_close(run(model, inputs), ref, 1e-5, "merged adapter")


def test_dora_fallback_matches_stock_dora(base, inputs):
    """DoRA on the merged projection (block-diagonal) equals stock DoRA on to_q/k/v: a real fallback check."""
    cfg = dict(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], use_dora=True)
    stock = stock_with_adapter(base, cfg, seed=5)
    model = fresh(base, True)
    with pytest.warns(UserWarning, match="mapped to the merged"):
        add_lora(model, LoraConfig(**cfg))
    sd = convert_lora({k: v for k, v in get_peft_model_state_dict(stock).items() if "magnitude" not in k}, "merged")
    for i, blk in enumerate(stock.transformer_blocks):  # magnitude vectors: per output row, concatenated
        sd[f"transformer_blocks.{i}.attn.to_qkv.lora_magnitude_vector"] = torch.cat(
            [getattr(blk.attn, n).lora_magnitude_vector["default"].weight for n in ("to_q", "to_k", "to_v")])
    set_peft_model_state_dict(model, sd)
    assert linear_lora_factors(model.transformer_blocks[0].attn.to_qkv) is None
    assert_close(run(model, inputs), run(stock, inputs), 1e-5, "DoRA")


# ---- peft training on a fused model == on the stock model ----------------------------------------------------

def test_training_matches_stock(base, inputs):
    # rslora, rank/alpha patterns and a top-level target too: all must map exactly
    cfg = dict(r=2, lora_alpha=3, use_rslora=True, rank_pattern={"img_mlp.net.2": 3}, alpha_pattern={"to_out.0": 5},
               target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                               "img_mlp.net.2", "proj_out"])
    torch.manual_seed(7)
    stock = copy.deepcopy(base).train()
    stock.add_adapter(LoraConfig(**cfg))
    model = fresh(base, True).train()
    with pytest.warns(UserWarning, match="mapped to the merged"):
        add_lora(model, LoraConfig(**cfg))
    set_peft_model_state_dict(model, convert_lora(get_peft_model_state_dict(stock), "merged"))
    target = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(8))
    losses = []
    for m in (stock, model):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
        run_losses = []
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(m(**inputs).sample, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run_losses.append(loss.item())
        losses.append(run_losses)
    assert losses[0][-1] < losses[0][0]  # it trained
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-5 * abs(b), losses
    trained = convert_lora(get_peft_model_state_dict(model), "standard")
    ref = get_peft_model_state_dict(stock)
    assert sorted(trained) == sorted(ref)
    for k in ref:
        assert trained[k].shape == ref[k].shape
        assert_close(trained[k], ref[k], 1e-4, k)


def test_add_adapter_with_merged_names_trains(base, inputs):
    model = fresh(base, True).train()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_qkv", "add_qkv_proj", "to_out.0"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert linear_lora_factors(model.transformer_blocks[0].attn.to_qkv)[2] is not None
    model(**inputs).sample.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "to_qkv.lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # peft's state dict and diffusers' own LoRA saving work; the file loads back through both loaders
    sd = get_peft_model_state_dict(model)
    assert any("to_qkv.lora_A" in k for k in sd)


def test_diffusers_saving_on_fused_model(base, inputs, tmp_path):
    model = fresh(base, True)
    load_lora(model, write(merged_lora(), "kohya"))
    ref = run(model, inputs)
    QwenImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    other = fresh(base, True)
    load_lora(other, path)
    assert_close(run(other, inputs), ref, 1e-6, "qwen_fused.load_lora of diffusers' file")
    other = fresh(base, True)
    QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, other).load_lora_weights(path)
    assert_close(run(other, inputs), ref, 1e-6, "diffusers' load_lora_weights on a fused model")
    stock = fresh(base, False)
    load_lora(stock, path)  # merged file onto the stock model
    assert_close(run(stock, inputs), ref, 1e-5, "onto stock")


# ---- save_lora ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_save_lora_loads_in_diffusers(base, inputs, tmp_path, layout):
    lora = standard_lora()
    ref = run(by_hand(base, (lora, 1.0)), inputs)
    model = fresh(base, True)
    load_lora(model, write(lora, "lightning"))
    path = tmp_path / "out.safetensors"
    meta = save_lora(model, path, layout=layout)
    with safe_open(str(path), "pt") as f:
        written = f.metadata()
        keys = list(f.keys())
    assert written == meta and meta["layout"] == layout and meta["form"] == "standard"
    assert {"rank", "alpha", "targets"} <= set(meta) and "attn.to_q" in meta["targets"]
    assert all(k.startswith("lora_unet_" if layout == "kohya" else "transformer.") for k in keys)
    assert detect_lora_layout(load_file(str(path))) == layout
    # back through load_lora (fused and stock) ...
    for fused in (True, False):
        again = fresh(base, fused)
        load_lora(again, path)
        assert_close(run(again, inputs), ref, 1e-5, f"load_lora fused={fused}")
    # ... and through diffusers' own load_lora_weights on a stock pipeline
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, fresh(base, False))
    pipe.load_lora_weights(str(path), adapter_name="x")
    assert_close(run(pipe.transformer, inputs), ref, 1e-5, "diffusers load_lora_weights")


def test_save_lora_refuses_overwrite_and_keeps_ranks(tmp_path):
    path = tmp_path / "x.safetensors"
    sd = write(standard_lora(), "kohya")
    save_lora(sd, path, layout="kohya")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_lora(sd, path, layout="kohya")
    assert path.read_bytes() == before
    save_lora(sd, path, layout="diffusers", to="merged", overwrite=True)
    assert [f for f in os.listdir(tmp_path) if f != "x.safetensors"] == []  # no temp file left
    parsed = parse_lora(*qwen_fused.lora.read_lora(path))
    assert parsed.form == "merged" and parsed.layout == "diffusers"
    assert_same_deltas(write({n: (f.a, f.b, f.alpha) for n, f in parsed.modules.items()}, "peft"), sd, 1e-5)


def test_save_merged_as_standard_shared_factors(base, inputs, merged_ref, tmp_path):
    """merged -> standard gives q/k/v the same A (and row views of B): still written and read back."""
    path = tmp_path / "std.safetensors"
    save_lora(write(merged_lora(), "peft"), path, layout="kohya")
    assert parse_lora(load_file(str(path))).form == "standard"
    model = fresh(base, True)
    load_lora(model, path)
    assert model.transformer_blocks[0].attn.to_qkv.lora_A["default"].weight.shape[0] == 3  # shared A: rank r
    assert_close(run(model, inputs), merged_ref, 1e-5, "merged -> kohya standard -> fused")


# ---- Lightning fused into base weights commutes with fuse_qkv ----------------------------------------------

def test_lightning_fuse_then_fuse_qkv_equals_reverse(base):
    sd = write(standard_lora(), "lightning")
    a = load_lora(copy.deepcopy(base), sd, fuse=True)
    fuse_qkv(a)
    b = fuse_qkv(copy.deepcopy(base))
    load_lora(b, sd, fuse=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer_blocks.0.attn.to_qkv.weight"],
                           fuse_qkv(copy.deepcopy(base)).state_dict()["transformer_blocks.0.attn.to_qkv.weight"])


# ---- bad input: clear error, model and files untouched ------------------------------------------------------

def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    sd = model.state_dict()
    return sorted(sd) == sorted(snap) and all(torch.equal(sd[k], snap[k]) for k in snap)


def _bad_cases(tmp_path):
    good = write(standard_lora(), "diffusers")
    extra = dict(good)
    extra["transformer.transformer_blocks.5.attn.to_q.lora_A.weight"] = torch.zeros(2, INNER)  # 2 layers only
    extra["transformer.transformer_blocks.5.attn.to_q.lora_B.weight"] = torch.zeros(INNER, 2)
    extra["transformer.nonexistent.lora_A.weight"] = torch.zeros(2, INNER)
    extra["transformer.nonexistent.lora_B.weight"] = torch.zeros(INNER, 2)
    shape = dict(good)
    shape["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"] = torch.zeros(4, 50)
    shape["transformer.transformer_blocks.1.attn.to_k.lora_B.weight"] = torch.zeros(INNER, 4)
    flux = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 8),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(24, 2)}
    std = standard_lora()
    q, k = {"transformer_blocks.0.attn.to_q": std["transformer_blocks.0.attn.to_q"]}, \
        {"transformer_blocks.0.attn.to_k": std["transformer_blocks.0.attn.to_k"]}
    mixed = {**write(q, "kohya"), **write(k, "diffusers")}
    mixed_form = {**write(q, "peft"),
                  **write({"transformer_blocks.1.attn.to_qkv": merged_lora()["transformer_blocks.0.attn.to_qkv"]},
                          "peft")}
    missing_b = {k: v for k, v in good.items() if k != "transformer.transformer_blocks.0.attn.to_v.lora_B.weight"}
    dora = dict(good, **{"transformer.transformer_blocks.0.attn.to_q.dora_scale": torch.ones(1, INNER)})
    diff_b = dict(good, **{"transformer.transformer_blocks.0.attn.to_q.diff_b": torch.ones(INNER)})
    notsft = tmp_path / "notes.safetensors"
    notsft.write_bytes(b"this is not a safetensors file at all")
    pickled = tmp_path / "lora.bin"
    torch.save(good, pickled)
    truncated = tmp_path / "truncated.safetensors"
    save_file(good, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return [
        ("unmatched", extra, r"transformer_blocks\.5\.attn\.to_q.*nonexistent|nonexistent.*transformer_blocks\.5"),
        ("shape", shape, r"transformer_blocks\.1\.attn\.to_k.*\(4, 50\).*out 96, in 96"),
        ("other-model", flux, "another model"),
        ("mixed", mixed, "mixed LoRA layouts.*kohya.*diffusers|mixed LoRA layouts.*diffusers.*kohya"),
        ("mixed-form", mixed_form, "mixed LoRA layouts.*merged.*standard"),
        ("missing-B", missing_b, r"missing A or B.*to_v"),
        ("dora", dora, "DoRA"),
        ("diff_b", diff_b, r"to_q\.diff_b \(full bias difference\)"),
        ("not-safetensors", notsft, "not a readable safetensors"),
        ("pickled", pickled, "pickled"),
        ("truncated", truncated, "not a readable safetensors"),
        ("no-file", tmp_path / "missing.safetensors", "not found"),
    ]


@pytest.mark.parametrize("fused", [False, True], ids=["stock-model", "fused-model"])
@pytest.mark.parametrize("fuse", [False, True], ids=["adapter", "fuse"])
def test_bad_input(base, tmp_path, fuse, fused):
    model = fresh(base, fused)
    snap = _snapshot(model)
    for name, source, pattern in _bad_cases(tmp_path):
        file_before = source.read_bytes() if hasattr(source, "read_bytes") and source.exists() else None
        with pytest.raises((ValueError, FileNotFoundError), match=pattern):
            load_lora(model, source, fuse=fuse)
        assert _unchanged(model, snap), name
        assert not getattr(model, "peft_config", {}), name
        if file_before is not None:
            assert source.read_bytes() == file_before


def test_bad_adapter_name(base):
    model = fresh(base, True)
    sd = write(standard_lora(), "kohya")
    load_lora(model, sd, adapter_name="style")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="'style' already exists"):
        load_lora(model, sd, adapter_name="style")
    assert _unchanged(model, snap)


def test_add_lora_refuses_unequal_qkv_scales(base):
    """One merged adapter has one scale: q/k/v with different alpha/r cannot train as stock does."""
    model = fresh(base, True)
    snap = _snapshot(model)
    cfg = LoraConfig(r=2, lora_alpha=2, alpha_pattern={"to_k": 4}, target_modules=["to_q", "to_k", "to_v"])
    with pytest.raises(ValueError, match=r"to_qkv: q/k/v parts have different LoRA scales \[1.0, 2.0\]"):
        add_lora(model, cfg)
    assert _unchanged(model, snap) and not getattr(model, "peft_config", {})


def test_add_lora_gaussian_init_matches_stock_distribution(base):
    """peft's gaussian init draws A ~ N(0, 1/r); each q/k/v block of the merged A keeps its own part's 1/r."""
    torch.manual_seed(0)
    model = fresh(base, True)
    cfg = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", rank_pattern={"add_k_proj": 2},
                     target_modules=["to_q", "to_k", "to_v", "add_k_proj"])
    with pytest.warns(UserWarning, match="mapped to the merged"):
        add_lora(model, cfg)
    a = torch.cat([blk.attn.to_qkv.lora_A["default"].weight for blk in model.transformer_blocks], dim=1)
    assert a.shape[0] == 6
    assert abs(a.std().item() - 1 / 2) < 0.05  # stock: 1 / r = 0.5 per part (not 1 / 6 for the merged rank)
    a = torch.cat([blk.attn.add_qkv_proj.lora_A["default"].weight for blk in model.transformer_blocks], dim=1)
    assert a.shape[0] == 2 and abs(a.std().item() - 1 / 2) < 0.05


def test_convert_errors():
    with pytest.raises(ValueError, match="to must be"):
        convert_lora(write(standard_lora(), "peft"), "fused")
    bad = write(merged_lora(), "peft")
    bad["transformer_blocks.0.attn.to_qkv.lora_B.weight"] = torch.zeros(100, 3)
    with pytest.raises(ValueError, match="to_qkv.*100 rows"):
        convert_lora(bad, "standard")


def test_mixed_precision_lora_takes_fast_path_and_is_no_worse_than_stock(base, inputs):
    """bf16 model + fp32 LoRA factors (what mixed-precision training keeps): the fused op computes it directly
    (no fallback), and is no further from a float64 run than stock diffusers + peft in the same setup."""
    cfg = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"])
    stock = stock_with_adapter(base, cfg, seed=11)
    sd = get_peft_model_state_dict(stock)
    ref = run(copy.deepcopy(stock).double(), {k: (v.double() if torch.is_tensor(v) and v.is_floating_point()
                                                  else v) for k, v in inputs.items()})
    model = fresh(base, True)
    with pytest.warns(UserWarning, match="mapped to the merged"):
        add_lora(model, LoraConfig(**cfg))
    set_peft_model_state_dict(model, convert_lora(sd, "merged"))
    outs = []
    for m in (stock, model):
        m.to(torch.bfloat16)
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        half = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
        outs.append(run(m, half))
    factors = linear_lora_factors(model.transformer_blocks[0].attn.to_qkv)
    assert factors is not None and factors[2].dtype == torch.float32 and factors[0].dtype == torch.bfloat16
    stock_err, fused_err = rel_err(outs[0], ref), rel_err(outs[1], ref)
    assert fused_err[1] <= 1.25 * stock_err[1] + 1e-4, (fused_err, stock_err)


def test_add_adapter_on_fused_model_maps_standard_names(base, inputs):
    """`transformer.add_adapter` itself (diffusers' API) accepts standard q/k/v names on a fused model."""
    cfg = dict(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    stock = stock_with_adapter(base, cfg)
    model = fresh(base, True)
    with pytest.warns(UserWarning, match="mapped to the merged"):
        model.add_adapter(LoraConfig(**cfg))
    assert hasattr(model.transformer_blocks[0].attn.to_qkv, "lora_A")
    set_peft_model_state_dict(model, convert_lora(get_peft_model_state_dict(stock), "merged"))
    assert_close(run(model, inputs), run(stock, inputs), 1e-5, "add_adapter with standard names")
    model.unload_lora()
    qwen_fused.unfuse_qkv(model)
    assert "add_adapter" not in model.__dict__
