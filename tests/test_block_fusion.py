"""Fused block forward (`qwen_fused.fuse_blocks`) vs stock diffusers: output, every gradient, fallbacks (fp32, CPU).

The reference is always an unfused copy of the same random tiny transformer (with the same peft LoRA where one is
used). A counter on the block ops shows which path each run took: a fallback must be taken where expected, and
the fused path everywhere else (a silent fallback would pass the comparisons).
"""
import copy
import functools

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from helpers import assert_close, clone_inputs, merged_view, tiny_inputs, tiny_transformer
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

import qwen_fused
from qwen_fused import block as block_mod
from qwen_fused.kernels import set_backend
from qwen_fused.lora import add_lora
from qwen_fused.names import STREAMS

TOL = 1e-5
MODEL = dict(heads=3, head_dim=32, layers=2)
# batch 2, odd text length with a padding mask, target + one edit image of odd sizes
INPUTS = dict(batch=2, txt_len=7, img_shapes=((1, 3, 5), (1, 2, 3)), valid_lens=(7, 4))
QKV_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
OUT_TARGETS = ["to_out.0", "to_add_out", "img_mlp.net.2", "txt_mlp.net.2"]


@pytest.fixture
def calls(monkeypatch):
    """How often each block op ran (patched where the fused forward looks them up)."""
    counts = dict.fromkeys(["modulated_layernorm", "linear_gelu", "linear_gate_residual"], 0)
    for name in counts:
        def counted(*args, _op=getattr(block_mod, name), _name=name, **kwargs):
            counts[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(block_mod, name, counted)
    return counts


@pytest.fixture
def triton_backend():
    set_backend("triton")
    try:
        yield
    finally:
        set_backend(None)


def _run(model, kw, backward=True):
    out = model(**kw).sample
    if backward:  # weighted so that every element's gradient differs
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out


def _stock_grads_as_fused(stock):
    """Stock gradients under the fused model's names: q/k/v base weights and LoRA A concatenated, LoRA B
    block-diagonal (standard q/k/v LoRAs on a fused model, qwen_fused.add_lora)."""
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for merged, parts in STREAMS.items():
        for name in [n for n in grads if f".attn.{parts[0]}.lora_B." in n]:
            stem, leaf = name.split(f".attn.{parts[0]}.")
            grads[f"{stem}.attn.{merged}.{leaf}"] = torch.block_diag(
                *[grads.pop(f"{stem}.attn.{p}.{leaf}") for p in parts])
    return merged_view(grads)


def _compare(fused, stock, input_kw=INPUTS, backward=True, tol=TOL):
    kw = tiny_inputs(requires_grad=backward, **input_kw)
    kw2 = clone_inputs(kw)
    torch.manual_seed(0)  # the same dropout draws where dropout is live
    ref = _run(stock, kw, backward)
    torch.manual_seed(0)
    out = _run(fused, kw2, backward)
    assert_close(out, ref, tol, "output")
    if not backward:
        return
    for name in ("hidden_states", "encoder_hidden_states"):
        assert_close(kw2[name].grad, kw[name].grad, tol, f"grad {name}")
    expect = _stock_grads_as_fused(stock)
    got = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert got.keys() == expect.keys()
    for name, g in got.items():
        if expect[name] is None:  # the last block's text stream does not reach the output (compiled: zeros)
            assert g is None or not g.any(), name
        elif expect[name].abs().max() == 0:
            assert g is not None and g.abs().max() == 0, name
        else:
            assert g is not None, f"no gradient for {name}"
            assert_close(g, expect[name], tol, f"grad {name}")


def _pair(model_kw=MODEL):
    stock = tiny_transformer(**model_kw)
    return stock, qwen_fused.fuse_qkv(copy.deepcopy(stock))


def _lora_pair(targets, order, seed=3):
    """Stock + peft LoRA (random B, so it is live) and the fused model with the same adapter; `order` says whether
    fuse_blocks runs before or after the adapter is added."""
    stock, fused = _pair()
    cfg = dict(r=2, lora_alpha=3, target_modules=targets)
    torch.manual_seed(seed)
    stock.add_adapter(LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in stock.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    if order == "before":
        qwen_fused.fuse_blocks(fused)
    with pytest.warns(UserWarning, match="mapped to the merged"):
        add_lora(fused, LoraConfig(**cfg))
    set_peft_model_state_dict(fused, qwen_fused.convert_lora(get_peft_model_state_dict(stock), "merged"))
    if order == "after":
        qwen_fused.fuse_blocks(fused)
    return stock.train(), fused.train()


@pytest.mark.parametrize("input_kw", [
    pytest.param(INPUTS, id="B2-T7-mask-2imgs"),
    pytest.param(dict(batch=2, txt_len=1, img_shapes=((1, 1, 7), (1, 3, 3), (1, 2, 1))), id="B2-T1-3imgs"),
])
def test_matches_stock(input_kw, calls):
    stock, fused = _pair()
    qwen_fused.fuse_blocks(fused)
    _compare(fused, stock, input_kw)
    layers = MODEL["layers"]
    assert calls == dict(modulated_layernorm=4 * layers, linear_gelu=2 * layers, linear_gate_residual=4 * layers)


@pytest.mark.parametrize("order", ["before", "after"])
def test_peft_lora_matches_stock_lora(order, calls):
    stock, fused = _lora_pair(QKV_TARGETS + OUT_TARGETS, order)
    _compare(fused, stock)
    # LoRA on every output projection: all four still take the fused op (their factors are W + s B A)
    assert calls["linear_gate_residual"] == 4 * MODEL["layers"] and calls["linear_gelu"] == 2 * MODEL["layers"]
    assert any(".to_qkv.lora_B." in n for n, p in fused.named_parameters() if p.grad is not None)


def test_lora_on_mlp_up_projection_runs_the_module(calls):
    stock, fused = _lora_pair(QKV_TARGETS + OUT_TARGETS + ["img_mlp.net.0.proj"], "after")
    _compare(fused, stock)
    # the image MLP's up projection (a peft layer) runs as its module; the text MLP's keeps linear_gelu
    assert calls["linear_gelu"] == MODEL["layers"] and calls["linear_gate_residual"] == 4 * MODEL["layers"]


def test_dropout_in_training_falls_back_exactly(calls):
    stock, fused = _pair()
    qwen_fused.fuse_blocks(fused)
    for model in (stock, fused):
        for blk in model.transformer_blocks:
            blk.attn.to_out[1].p = 0.2
            blk.img_mlp.net[1].p = blk.txt_mlp.net[1].p = 0.3
        model.train()
    _compare(fused, stock)
    # only to_add_out has no dropout after it; the other three gated projections run stock's expression
    assert calls["linear_gate_residual"] == MODEL["layers"] and calls["linear_gelu"] == 0
    # in eval mode dropout is the identity: the fused path again, equal to stock
    calls.update(dict.fromkeys(calls, 0))
    _compare(fused.eval(), stock.eval(), backward=False)
    assert calls["linear_gate_residual"] == 4 * MODEL["layers"]


def test_zero_cond_t_falls_back_to_stock(calls):
    stock, fused = _pair(dict(MODEL, zero_cond_t=True))
    qwen_fused.fuse_blocks(fused)
    _compare(fused, stock)
    assert not any(calls.values())


def test_hooked_norm_falls_back_to_stock(calls):
    stock, fused = _pair()
    qwen_fused.fuse_blocks(fused)
    seen = []
    for model in (stock, fused):
        model.transformer_blocks[0].img_norm2.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    _compare(fused, stock)
    assert len(seen) == 2  # the hook ran in both models
    assert calls["modulated_layernorm"] == 4  # block 1 only


def test_unknown_attention_kwargs_fall_back_to_stock(calls):
    stock, fused = _pair()
    qwen_fused.fuse_blocks(fused)
    kw = dict(attention_kwargs={"scale": 1.0})  # popped by diffusers before the blocks: the fused path
    with torch.no_grad():
        assert torch.equal(fused(**tiny_inputs(**INPUTS), **kw).sample, stock(**tiny_inputs(**INPUTS), **kw).sample)
    assert calls["linear_gate_residual"] == 4 * MODEL["layers"]
    calls.update(dict.fromkeys(calls, 0))
    kw = dict(attention_kwargs={"unknown": 1})  # stock warns and drops it; so does the fallback
    with torch.no_grad():
        assert torch.equal(fused(**tiny_inputs(**INPUTS), **kw).sample, stock(**tiny_inputs(**INPUTS), **kw).sample)
    assert not any(calls.values())


def test_gradient_checkpointing(calls):
    stock, fused = _pair()
    qwen_fused.fuse_blocks(fused)
    for model in (stock, fused):
        model.enable_gradient_checkpointing()
        model.train()
    _compare(fused, stock)
    # forward, then the forward again inside backward (non-reentrant checkpoint recomputes it)
    assert calls["linear_gate_residual"] == 2 * 4 * MODEL["layers"]


def test_compile_repeated_blocks_fullgraph(calls):
    stock, fused = _pair()
    qwen_fused.fuse_blocks(fused)
    torch._dynamo.reset()
    # diffusers matches blocks by class name: the instance-level forward is what the compiled _call_impl calls
    fused.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    assert all(b._compiled_call_impl is not None for b in fused.transformer_blocks)
    _compare(fused, stock)
    assert calls["linear_gate_residual"] > 0  # traced through the fused forward


def test_unfuse_restores_stock_forward_and_state_dict_unchanged():
    stock, fused = _pair()
    kw = tiny_inputs(**INPUTS)
    with torch.no_grad():
        before = fused(**clone_inputs(kw)).sample
    sd = fused.state_dict()
    assert qwen_fused.fuse_blocks(fused) is fused and qwen_fused.is_blocks_fused(fused)
    assert all(isinstance(b, QwenImageTransformerBlock) and type(b) is QwenImageTransformerBlock
               for b in fused.transformer_blocks)
    after = fused.state_dict()
    assert list(after) == list(sd) and all(after[k] is sd[k] or torch.equal(after[k], sd[k]) for k in sd)
    copied = copy.deepcopy(fused)  # the copy's forward is bound to the copy's blocks
    assert all(b.forward.__self__ is b for b in copied.transformer_blocks)
    assert qwen_fused.unfuse_blocks(fused) is fused and not qwen_fused.is_blocks_fused(fused)
    assert not any("forward" in vars(b) for b in fused.transformer_blocks)
    with torch.no_grad():
        assert torch.equal(fused(**clone_inputs(kw)).sample, before)


def test_unfuse_qkv_under_fused_blocks_runs_stock(calls):
    """unfuse_qkv puts the stock processor back: the fused forward sees it and runs the stock forward."""
    stock, fused = _pair()
    qwen_fused.unfuse_qkv(qwen_fused.fuse_blocks(fused))
    _compare(fused, stock, backward=False)
    assert not any(calls.values())


def test_errors():
    stock, fused = _pair()
    with pytest.raises(ValueError, match="fuse_qkv"):
        qwen_fused.fuse_blocks(stock)
    with pytest.raises(TypeError, match="QwenImageTransformer2DModel"):
        qwen_fused.fuse_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not fused"):
        qwen_fused.unfuse_blocks(fused)
    qwen_fused.fuse_blocks(fused)
    with pytest.raises(ValueError, match="already fused"):
        qwen_fused.fuse_blocks(fused)
    blk = fused.transformer_blocks[0]
    ours = blk.forward
    blk.forward = functools.partial(ours)  # what diffusers' and accelerate's hooks do
    with pytest.raises(ValueError, match="remove those hooks"):
        qwen_fused.unfuse_blocks(fused)
    blk.forward = ours
    qwen_fused.unfuse_blocks(fused)
    blk.forward = functools.partial(type(blk).forward, blk)
    with pytest.raises(ValueError, match="before enabling them"):
        qwen_fused.fuse_blocks(fused)
    assert not any("forward" in vars(b) for b in fused.transformer_blocks[1:])  # nothing changed


@pytest.mark.kernel
@pytest.mark.parametrize("lora", [False, True], ids=["no-lora", "lora"])
def test_triton_route_matches_stock(lora, triton_backend, calls):
    """The Triton block ops (interpreter on CPU, fp32) in the fused forward, against stock."""
    if lora:
        stock, fused = _lora_pair(QKV_TARGETS + OUT_TARGETS, "after")
    else:
        stock, fused = _pair()
        qwen_fused.fuse_blocks(fused)
    _compare(fused, stock)
    assert calls["linear_gate_residual"] == 4 * MODEL["layers"]


@pytest.mark.gpu
def test_real_width_bf16_no_further_from_float64_than_stock():
    """One block at real width (24 x 128) in bf16 on CUDA, fused blocks on the Triton route: output and input
    gradients no further from a float64 run than stock bf16 is (design.md: GPU numerics)."""
    from qwen_fused.numerics import rel_err
    from qwen_fused.tiny import random_transformer

    cfg = dict(num_layers=1, num_attention_heads=24, attention_head_dim=128, joint_attention_dim=64,
               axes_dims_rope=(16, 56, 56), in_channels=64, out_channels=16)
    dev = torch.device("cuda")
    ref = random_transformer(0, device=dev, dtype=torch.float64, **cfg)
    stock = random_transformer(0, device=dev, dtype=torch.bfloat16, **cfg)
    fused = qwen_fused.fuse_blocks(qwen_fused.fuse_qkv(copy.deepcopy(stock)))
    g = torch.Generator(device=dev).manual_seed(1)
    img_shapes = [[(1, 16, 16), (1, 16, 12)]]
    base = dict(hidden_states=torch.randn(1, 448, 64, generator=g, device=dev, dtype=torch.float64),
                encoder_hidden_states=torch.randn(1, 77, 64, generator=g, device=dev, dtype=torch.float64),
                timestep=torch.full((1,), 0.5, device=dev, dtype=torch.float64))
    weights = torch.randn(1, 448, 64, generator=g, device=dev, dtype=torch.float64)  # patch 2 x 2 x 16 channels

    def run(model, dtype):
        kw = {k: v.detach().to(dtype).requires_grad_(k != "timestep") for k, v in base.items()}
        out = model(**kw, img_shapes=img_shapes).sample
        (out.double() * weights).sum().backward()
        return [out.detach(), kw["hidden_states"].grad, kw["encoder_hidden_states"].grad]

    set_backend("triton")
    try:
        want = run(ref, torch.float64)
        got_stock, got_fused = run(stock, torch.bfloat16), run(fused, torch.bfloat16)
    finally:
        set_backend(None)
    for name, r, s, f in zip(("output", "grad hidden_states", "grad encoder_hidden_states"), want, got_stock,
                             got_fused):
        (s_max, s_rms), (f_max, f_rms) = rel_err(s, r), rel_err(f, r)
        assert f_max <= 1.25 * s_max + 1e-6 and f_rms <= 1.25 * s_rms + 1e-6, (name, f_max, s_max, f_rms, s_rms)
