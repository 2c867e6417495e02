"""Qwen-Image 2.1 (issue 20): the fused single-stream transformer against stock diffusers (+ peft), fp32 on CPU.

Output and every gradient within 1e-5 relative; both processors (the flex one forward only: flex attention has no
backward on CPU); the prefix KV cache in both modes; the block-causal structure reaching attention; unfuse bit for
bit; meta-device models; diffusers' own fuse_projections; peft LoRA; the opt-in merged SwiGLU (model and op, with
LoRA on either part; its Triton gate under the interpreter).
"""
import copy

import pytest
import torch
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage21 import (
    BlockMask,
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
    QwenImage21KVCache,
)
from helpers import assert_close, clone_inputs, merged_view

import qwen_fused
from qwen_fused.families.qwenimage21_processor import FusedQwenImage21AttnProcessor, FusedQwenImage21FlexAttnProcessor
from qwen_fused.families.tiny21 import random_inputs, random_transformer

TOL = 1e-5
# flex attention runs uncompiled on CPU (and warns that it would be slow at size)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CASES = [
    # id, model kwargs, input kwargs
    pytest.param({}, dict(text=(7,), conditions=()), id="t2i-H2xD32-B2"),
    pytest.param({}, dict(batch=1, text=(3, 2), conditions=((1, 4, 4),)), id="1cond-B1"),
    pytest.param({}, dict(text=(2, 3, 1), conditions=((1, 2, 6), (1, 4, 2)), target=(1, 2, 2)), id="2cond-B2"),
    pytest.param({}, dict(text=(3, 4), pad=(0, 3)), id="1cond-pad"),
    pytest.param(dict(attention_head_dim=128), dict(text=(2, 1, 3), conditions=((1, 2, 2), (1, 4, 2)), pad=(2, 0)),
                 id="2cond-pad-H2xD128"),
]


def _pair(processor=None, **model_kw):
    stock = random_transformer(**model_kw)
    if processor is not None:
        stock.set_attn_processor(processor())
    return stock, qwen_fused.fuse_qkv(copy.deepcopy(stock))


def _loss(out):
    # weight the output so every element's gradient differs
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def _run(model, kw, backward=True, **extra):
    out = model(**kw, **extra).sample
    if backward:
        _loss(out).backward()
    return out


def _nothing(grad):
    return grad is None or not grad.any()


def _assert_grads_match(fused, stock, kw_fused, kw_stock, unused=()):
    """Every gradient of the fused run against stock's; `unused`: name parts of what cannot get one (none or zero
    in both)."""
    for name in ("hidden_states", "encoder_hidden_states"):
        if name in unused:
            assert _nothing(kw_fused[name].grad) and _nothing(kw_stock[name].grad), name
            continue
        assert_close(kw_fused[name].grad, kw_stock[name].grad, TOL, f"grad {name}")
    # to_qkv's gradient against the concatenated stock to_q/k/v gradients; every other parameter by name
    stock_grads = merged_view({n: p.grad for n, p in stock.named_parameters()})
    fused_grads = {n: p.grad for n, p in fused.named_parameters()}
    assert stock_grads.keys() == fused_grads.keys()
    assert any(".attn.to_qkv." in n for n in fused_grads) and any(".norm_q." in n for n in fused_grads)
    for name, g in fused_grads.items():
        if any(u in name for u in unused):
            assert _nothing(g) and _nothing(stock_grads[name]), name
            continue
        assert g is not None and stock_grads[name] is not None, f"no gradient for {name}"
        assert stock_grads[name].abs().max() > 0, f"{name}: zero stock gradient tests nothing"
        assert_close(g, stock_grads[name], TOL, f"grad {name}")


@pytest.mark.parametrize("model_kw,input_kw", CASES)
def test_forward_and_gradients_match_stock(model_kw, input_kw):
    stock, fused = _pair(**model_kw)
    attn = fused.transformer_blocks[0].attn
    assert type(attn.processor) is FusedQwenImage21AttnProcessor and not hasattr(attn, "to_q")
    kw = random_inputs(stock, requires_grad=True, **input_kw)
    kw2 = clone_inputs(kw)
    ref = _run(stock, kw)
    out = _run(fused, kw2)
    assert_close(out, ref, TOL, "output")
    _assert_grads_match(fused, stock, kw2, kw)


class _StubProcessor:
    """What QwenImage21Pipeline.__init__ reads of its Qwen3-VL processor (the pipeline runs nothing here)."""

    class tokenizer:  # noqa: N801
        encode = staticmethod(lambda text: [0])

    def apply_chat_template(self, *args, **kwargs):
        return [[0, 1]]


def test_pipeline_is_fused_through_its_transformer():
    stock = random_transformer()
    pipe = QwenImage21Pipeline(scheduler=None, vae=None, text_encoder=None, processor=_StubProcessor(),
                               transformer=stock)
    assert qwen_fused.fuse_qkv(pipe) is stock and qwen_fused.is_fused(pipe)
    assert qwen_fused.unfuse_qkv(pipe) is stock and not qwen_fused.is_fused(pipe)


# ------------------------------------------------------------------------------------------------- the KV cache

@pytest.mark.parametrize("pad", [None, (0, 2)], ids=["nopad", "pad"])
def test_kv_cache_extract_then_cached_matches_stock(pad):
    """"extract" stores each layer's prefix K/V after RoPE; "cached" decodes the target from them."""
    stock, fused = _pair()
    kw = random_inputs(stock, text=(3, 4), pad=pad, requires_grad=True)
    caches = {}
    for name, model in (("stock", stock), ("fused", fused)):
        caches[name] = QwenImage21KVCache(len(model.transformer_blocks))
        with torch.no_grad():
            caches[name + "_out"] = _run(model, kw, backward=False, kv_cache=caches[name], kv_cache_mode="extract")
    assert_close(caches["fused_out"], caches["stock_out"], TOL, "extract output")
    for i, (f, s) in enumerate(zip(caches["fused"].layer_caches, caches["stock"].layer_caches)):
        assert_close(f.k, s.k, TOL, f"cached K {i}")
        assert_close(f.v, s.v, TOL, f"cached V {i}")
    kw2 = clone_inputs(kw)
    ref = _run(stock, kw, kv_cache=caches["stock"], kv_cache_mode="cached")
    out = _run(fused, kw2, kv_cache=caches["fused"], kv_cache_mode="cached")
    assert out.shape[1] == 24  # the target's tokens only
    assert_close(out, ref, TOL, "cached output")
    # decode equals the prefill's target rows: the cache is what the prefill computed
    assert_close(out, caches["fused_out"][:, -24:], TOL, "cached vs prefill")
    # the text enters only through the cached prefix (computed without gradients)
    _assert_grads_match(fused, stock, kw2, kw, unused=("encoder_hidden_states", "txt_in."))


# ---------------------------------------------------------------------------------------- the flex processor

def test_flex_processor_matches_stock_forward():
    """Flex attention runs on CPU without gradients only (torch: "FlexAttention does not support backward on
    CPU"), so this compares the forward; the mixed-processor model (one flex block) gets both inputs."""
    stock, fused = _pair(QwenImage21FlexAttnProcessor)
    assert all(type(b.attn.processor) is FusedQwenImage21FlexAttnProcessor for b in fused.transformer_blocks)
    kw = random_inputs(stock, text=(2, 3, 1), conditions=((1, 2, 6), (1, 4, 2)), target=(1, 2, 2), pad=(0, 2))
    with torch.no_grad():
        for setup in ("flex", "mixed"):
            if setup == "mixed":
                stock.transformer_blocks[1].attn.set_processor(QwenImage21AttnProcessor())
                fused.transformer_blocks[1].attn.set_processor(FusedQwenImage21AttnProcessor())
            assert_close(_run(fused, kw, backward=False), _run(stock, kw, backward=False), TOL, f"{setup} output")
            cache_s, cache_f = QwenImage21KVCache(2), QwenImage21KVCache(2)
            for mode in ("extract", "cached"):
                ref = _run(stock, kw, backward=False, kv_cache=cache_s, kv_cache_mode=mode)
                out = _run(fused, kw, backward=False, kv_cache=cache_f, kv_cache_mode=mode)
                assert_close(out, ref, TOL, f"{setup} {mode}")


# ------------------------------------------------------------------------ the block-causal structure is used

def _spy(cls, seen, full=False):
    """A `cls` that records the block-causal inputs it gets; with `full=True` it drops them (full attention).
    A subclass, so the model's isinstance test builds for it what it builds for `cls`."""

    class Spy(cls):
        def __call__(self, attn, hidden_states, attention_mask=None, segments=None, key_valid=None, **kw):
            seen.append((type(attention_mask), segments, key_valid is not None))
            if full:
                attention_mask, segments, key_valid = None, None, None
            return super().__call__(attn, hidden_states, attention_mask=attention_mask, segments=segments,
                                    key_valid=key_valid, **kw)

    return Spy()


@pytest.mark.parametrize("cls", [FusedQwenImage21AttnProcessor, FusedQwenImage21FlexAttnProcessor])
def test_block_causal_structure_reaches_attention(cls):
    """The model builds a BlockMask / segments by isinstance on its processors: the fused ones must get them, and
    these inputs must be sensitive to them (else the comparisons with stock above would test nothing)."""
    _, fused = _pair(QwenImage21FlexAttnProcessor if cls is FusedQwenImage21FlexAttnProcessor else None)
    assert all(type(b.attn.processor) is cls for b in fused.transformer_blocks)
    kw = random_inputs(fused, text=(3, 2), pad=(0, 1))
    seen = []
    with torch.no_grad():
        out = _run(fused, kw, backward=False)
        fused.set_attn_processor(_spy(cls, seen))
        assert_close(_run(fused, kw, backward=False), out, 0.0, "spied")
        fused.set_attn_processor(_spy(cls, [], full=True))
        full = _run(fused, kw, backward=False)
    assert len(seen) == 2 and all(has_key_valid for *_, has_key_valid in seen), seen
    if cls is FusedQwenImage21FlexAttnProcessor:
        assert all(mask is BlockMask and segments is None for mask, segments, _ in seen), seen
    else:
        assert all(mask is type(None) and len(segments) == 3 for mask, segments, _ in seen), seen
    assert (out - full).abs().max() > 1e-2 * out.abs().max(), "inputs insensitive to the block-causal mask"


# ------------------------------------------------------------------------------------- unfuse, meta, errors

@pytest.mark.parametrize("processor", [QwenImage21AttnProcessor, QwenImage21FlexAttnProcessor])
def test_unfuse_restores_state_dict_and_processor_bit_for_bit(processor):
    stock = random_transformer(dtype=torch.bfloat16)
    stock.set_attn_processor(processor())
    stock.set_attention_backend("native")
    stock.transformer_blocks[0].attn.to_k.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    grads = {n: p.requires_grad for n, p in stock.named_parameters()}
    model = qwen_fused.fuse_qkv(stock)
    assert qwen_fused.is_fused(model)
    attn = model.transformer_blocks[0].attn
    assert attn.to_qkv.bias is None and attn.to_qkv.weight.dtype == torch.bfloat16
    assert attn.to_qkv.weight.requires_grad  # one part trains: the merged weight trains
    assert all(b.attn.processor._attention_backend == "native" for b in model.transformer_blocks)
    qwen_fused.unfuse_qkv(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    # one merged weight has one requires_grad (any of its parts'): to_k comes back trainable, the rest as it was
    grads["transformer_blocks.0.attn.to_k.weight"] = True
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(type(b.attn.processor) is processor and b.attn.processor._attention_backend == "native"
               for b in model.transformer_blocks)
    assert not hasattr(model, "_qwen_fused_rope_hook") and not model.pos_embed._forward_hooks


def test_meta_device_model_fuses_and_unfuses():
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = QwenImage21Transformer2DModel(num_layers=2, num_attention_heads=4, attention_head_dim=128,
                                              context_in_dim=64, in_channels=16, out_channels=16)
    shapes = [(k, v.shape) for k, v in model.state_dict().items()]
    qwen_fused.fuse_qkv(model)
    qkv = model.transformer_blocks[1].attn.to_qkv.weight
    assert qkv.is_meta and qkv.shape == (3 * 512, 512)
    qwen_fused.unfuse_qkv(model)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == shapes


def test_diffusers_fuse_projections_is_not_fused():
    """diffusers' fuse_qkv_projections adds a to_qkv beside to_q/k/v: not ours, and fuse_qkv says what to do."""
    model = random_transformer()
    model.fuse_qkv_projections()
    attn = model.transformer_blocks[0].attn
    assert hasattr(attn, "to_qkv") and hasattr(attn, "to_q")
    assert not qwen_fused.is_fused(model)
    with pytest.raises(ValueError, match="fuse_projections"):
        qwen_fused.fuse_qkv(model)
    with pytest.raises(ValueError, match="not fused"):
        qwen_fused.unfuse_qkv(model)
    model.unfuse_qkv_projections()
    assert qwen_fused.is_fused(qwen_fused.fuse_qkv(model))


def test_errors():
    _, fused = _pair()
    with pytest.raises(ValueError, match="already fused"):
        qwen_fused.fuse_qkv(fused)
    stock = random_transformer()
    with pytest.raises(ValueError, match="not fused"):
        qwen_fused.unfuse_qkv(stock)
    stock.transformer_blocks[1].attn.set_processor(FusedQwenImage21AttnProcessor())  # a subclass of the stock class
    with pytest.raises(TypeError, match="transformer_blocks.1.attn uses processor FusedQwenImage21AttnProcessor"):
        qwen_fused.fuse_qkv(stock)
    assert hasattr(stock.transformer_blocks[0].attn, "to_q")  # untouched
    with pytest.raises(TypeError, match="QwenImage21Transformer2DModel"):
        qwen_fused.fuse_qkv(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="double-stream blocks; QwenImage21Transformer2DModel has none"):
        qwen_fused.fuse_blocks(fused)  # not a silent no-op


def test_qwen_image_works_without_2_1_in_diffusers(monkeypatch):
    """setup.py allows diffusers >= 0.36, which has no Qwen-Image 2.1: its family then has no class, and
    Qwen-Image fuses as before."""
    from helpers import tiny_transformer

    from qwen_fused.families import qwenimage21

    monkeypatch.setattr(qwenimage21, "model_class", lambda: None)
    model = qwen_fused.fuse_qkv(tiny_transformer())
    assert qwen_fused.is_fused(model)
    qwen_fused.unfuse_qkv(model)
    with pytest.raises(TypeError, match=r"works on diffusers' QwenImageTransformer2DModel, or a pipeline"):
        qwen_fused.fuse_qkv(random_transformer())


# -------------------------------------------------------------------------------------------------- LoRA

def test_standard_lora_from_stock_peft_matches_and_trains_block_diagonal():
    """A stock peft LoRA on to_q/k/v/to_out.0, loaded onto the fused model through qwen_fused.load_lora (the
    block-diagonal merged adapter): output and every LoRA gradient equal stock's."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    stock, fused = _pair()
    config = LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)  # random A and B: a zero B would hide a wrong layout
    stock.add_adapter(config)
    sd = get_peft_model_state_dict(stock)
    qwen_fused.load_lora(fused, sd, scale=2.0)
    stock.set_adapters(["default"], weights=[2.0])
    lora_qkv = fused.transformer_blocks[0].attn.to_qkv
    assert lora_qkv.lora_B["default"].weight.shape == (3 * 64, 9)  # rank r_q + r_k + r_v
    kw = random_inputs(stock, text=(3, 2), pad=(0, 1), requires_grad=True)
    kw2 = clone_inputs(kw)
    assert_close(_run(fused, kw2), _run(stock, kw), TOL, "LoRA output")
    n = 64
    for i, block in enumerate(fused.transformer_blocks):
        sa, fa = stock.transformer_blocks[i].attn, block.attn.to_qkv
        ga, gb = fa.lora_A["default"].weight.grad, fa.lora_B["default"].weight.grad
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            sp = getattr(sa, part)
            assert_close(ga[3 * j:3 * j + 3], sp.lora_A["default"].weight.grad, TOL, f"{i} {part} grad A")
            assert_close(gb[j * n:(j + 1) * n, 3 * j:3 * j + 3], sp.lora_B["default"].weight.grad, TOL,
                         f"{i} {part} grad B")
            off = gb[j * n:(j + 1) * n].clone()
            off[:, 3 * j:3 * j + 3] = 0
            assert off.abs().max() == 0, f"{i} {part}: off-diagonal B gradient"
        assert_close(block.attn.to_out[0].lora_A["default"].weight.grad,
                     sa.to_out[0].lora_A["default"].weight.grad, TOL, f"{i} to_out grad A")


def test_lora_scale_in_attention_kwargs_matches_stock():
    """diffusers scales the LoRA layers per call (`attention_kwargs={"scale": s}`): the kernel reads that scale."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    stock, fused = _pair()
    stock.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    qwen_fused.load_lora(fused, get_peft_model_state_dict(stock))
    kw = random_inputs(stock, text=(3, 2))
    with torch.no_grad():
        outs = [(_run(fused, kw, False, attention_kwargs={"scale": s}), _run(stock, kw, False,
                                                                            attention_kwargs={"scale": s}))
                for s in (1.0, 0.25)]
    for (out, ref), s in zip(outs, (1.0, 0.25)):
        assert_close(out, ref, TOL, f"scale {s}")
    assert (outs[0][0] - outs[1][0]).abs().max() > 1e-3 * outs[0][0].abs().max()  # the scale matters


@pytest.mark.parametrize("what", ["dropout", "norm-hook", "checkpointing"])
def test_module_fallbacks_and_gradient_checkpointing_match_stock(what):
    """What the kernel cannot take as weights runs as modules, then only the epilogue is fused: a LoRA with dropout
    (peft's Dropout, inactive in eval mode) and hooks on the QK norms. And gradient checkpointing (the model passes
    the hook's RoPE tables through torch.utils.checkpoint)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from qwen_fused.lora_factors import linear_lora_factors

    stock, fused = _pair()
    if what == "dropout":
        config = LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["to_q", "to_k", "to_v"],
                            init_lora_weights=False)
        stock.add_adapter(config)
        qwen_fused.load_lora(fused, get_peft_model_state_dict(stock))
        for model in (stock, fused):  # load_lora's adapters have no dropout: give both the same
            for mod in model.modules():
                if hasattr(mod, "lora_dropout") and "default" in mod.lora_dropout:
                    mod.lora_dropout["default"] = torch.nn.Dropout(0.1)
            model.eval()  # new modules start in training mode: dropout off, as at inference
        assert linear_lora_factors(fused.transformer_blocks[0].attn.to_qkv) is None  # the module path runs
    elif what == "norm-hook":
        for model in (stock, fused):
            for block in model.transformer_blocks:
                block.attn.norm_q.register_forward_hook(lambda m, args, out: out * 1.5)
    else:
        stock.enable_gradient_checkpointing()
        fused.enable_gradient_checkpointing()
        stock.train(), fused.train()
    kw = random_inputs(stock, text=(2, 3, 1), conditions=((1, 2, 6), (1, 4, 2)), pad=(0, 2), requires_grad=True)
    kw2 = clone_inputs(kw)
    assert_close(_run(fused, kw2), _run(stock, kw), TOL, "output")
    for name in ("hidden_states", "encoder_hidden_states"):
        assert_close(kw2[name].grad, kw[name].grad, TOL, f"grad {name}")
    if what != "dropout":  # (the LoRA's own gradients: the LoRA tests above)
        _assert_grads_match(fused, stock, kw2, kw)


def test_add_adapter_with_standard_names_stays_block_diagonal():
    """diffusers' add_adapter on the fused model (bound by fuse_qkv): to_q/k/v become one merged adapter of rank
    r_q + r_k + r_v whose off-diagonal B blocks stay zero while training (a plain peft LoRA on to_qkv would not be
    the stock model after one step)."""
    from peft import LoraConfig

    _, fused = _pair()
    with pytest.warns(UserWarning, match="mapped to the merged"):
        fused.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"],
                                     init_lora_weights="gaussian"))
    b = fused.transformer_blocks[0].attn.to_qkv.lora_B["default"].weight
    assert b.shape == (3 * 64, 6)
    _run(fused, random_inputs(fused, text=(3, 2)))  # B starts at zero; its gradient does not
    blocks = b.grad.view(3, 64, 3, 2)  # [q/k/v rows, out, q/k/v rank columns, r]
    off = blocks.clone()
    for j in range(3):
        assert blocks[j, :, j].abs().max() > 0
        off[j, :, j] = 0
    assert off.abs().max() == 0, "off-diagonal B gradient: the merged adapter would leave the stock model"


# ------------------------------------------------------------------------------------- merged SwiGLU (opt-in)

def _merged_mlp_view(stock_grads, qkv=True):
    """Stock name -> tensor in the merged layout: img_mlp.gate_up, and to_qkv (merged_view) when `qkv`."""
    out = merged_view(stock_grads) if qkv else dict(stock_grads)
    for name in [n for n in out if ".img_mlp.gate_layer." in n]:
        up = name.replace(".gate_layer.", ".proj.")
        out[name.replace(".gate_layer.", ".gate_up.")] = torch.cat([out.pop(name), out.pop(up)])
    return out


@pytest.mark.parametrize("with_qkv", [True, False], ids=["qkv+swiglu", "swiglu"])
def test_merged_swiglu_matches_stock(with_qkv):
    stock = random_transformer()
    fused = qwen_fused.fuse_swiglu(copy.deepcopy(stock))
    if with_qkv:
        qwen_fused.fuse_qkv(fused)
    assert qwen_fused.is_swiglu_fused(fused) and not qwen_fused.is_swiglu_fused(stock)
    mlp = fused.transformer_blocks[0].img_mlp
    assert list(dict(mlp.named_children())) == ["gate_up", "out"] and mlp.gate_up.weight.shape == (2 * 192, 64)
    kw = random_inputs(stock, text=(2, 3, 1), conditions=((1, 2, 6), (1, 4, 2)), pad=(0, 2), requires_grad=True)
    kw2 = clone_inputs(kw)
    assert_close(_run(fused, kw2), _run(stock, kw), TOL, "output")
    for name in ("hidden_states", "encoder_hidden_states"):
        assert_close(kw2[name].grad, kw[name].grad, TOL, f"grad {name}")
    stock_grads = _merged_mlp_view({n: p.grad for n, p in stock.named_parameters()}, qkv=with_qkv)
    fused_grads = {n: p.grad for n, p in fused.named_parameters()}
    assert stock_grads.keys() == fused_grads.keys()
    for name, g in fused_grads.items():
        assert stock_grads[name].abs().max() > 0, name
        assert_close(g, stock_grads[name], TOL, f"grad {name}")


def test_unfuse_swiglu_restores_state_dict_bit_for_bit_and_meta_models():
    from accelerate import init_empty_weights

    stock = random_transformer(dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    qwen_fused.unfuse_swiglu(qwen_fused.fuse_swiglu(stock))
    after = stock.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert type(stock.transformer_blocks[0].img_mlp).__name__ == "QwenImage21SwiGLUFeedForward"
    with init_empty_weights():
        meta = QwenImage21Transformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=128,
                                             context_in_dim=32, in_channels=16, out_channels=16)
    shapes = [(k, v.shape) for k, v in meta.state_dict().items()]
    qwen_fused.fuse_swiglu(meta)
    assert meta.transformer_blocks[0].img_mlp.gate_up.weight.is_meta
    qwen_fused.unfuse_swiglu(meta)
    assert [(k, v.shape) for k, v in meta.state_dict().items()] == shapes


def test_merged_swiglu_errors():
    model = qwen_fused.fuse_swiglu(random_transformer())
    with pytest.raises(ValueError, match="already merged"):
        qwen_fused.fuse_swiglu(model)
    with pytest.raises(ValueError, match="not merged"):
        qwen_fused.unfuse_swiglu(random_transformer())
    with pytest.raises(TypeError, match="Qwen-Image 2.1"):
        from helpers import tiny_transformer

        qwen_fused.fuse_swiglu(tiny_transformer())
    from qwen_fused.kernels.swiglu import swiglu

    x, w = torch.randn(2, 3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"lora_b must be \[2N=10, r=2\]"):
        swiglu(x, w, lora_a=torch.randn(2, 8), lora_b=torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"weight must be \[2N, C\]"):
        swiglu(x, torch.randn(9, 8))


@pytest.mark.parametrize("parts", [("gate_layer",), ("proj",), ("gate_layer", "proj")],
                         ids=["gate", "up", "both"])
def test_merged_swiglu_with_lora_on_either_part_matches_stock_peft(parts):
    """A stock peft LoRA on gate_layer and/or proj is, on gate_up, one LoRA with A concatenated and B
    block-diagonal (zero in the rows of a part without one): output and every LoRA gradient equal stock's."""
    from peft import LoraConfig

    stock = random_transformer()
    fused = qwen_fused.fuse_swiglu(copy.deepcopy(stock))
    r, n = 2, 192
    stock.add_adapter(LoraConfig(r=r, lora_alpha=3, target_modules=list(parts), init_lora_weights=False))
    fused.add_adapter(LoraConfig(r=r * len(parts), lora_alpha=3 * len(parts), target_modules=["gate_up"]))
    for sb, fb in zip(stock.transformer_blocks, fused.transformer_blocks):
        gu = fb.img_mlp.gate_up
        with torch.no_grad():
            a, b = gu.lora_A["default"].weight, gu.lora_B["default"].weight
            b.zero_()
            for j, part in enumerate(parts):
                rows = slice(0, n) if part == "gate_layer" else slice(n, 2 * n)
                a[j * r:(j + 1) * r] = getattr(sb.img_mlp, part).lora_A["default"].weight
                b[rows, j * r:(j + 1) * r] = getattr(sb.img_mlp, part).lora_B["default"].weight
    kw = random_inputs(stock, text=(3, 2), requires_grad=True)
    kw2 = clone_inputs(kw)
    assert_close(_run(fused, kw2), _run(stock, kw), TOL, "output")
    assert_close(kw2["hidden_states"].grad, kw["hidden_states"].grad, TOL, "grad hidden_states")
    for i, (sb, fb) in enumerate(zip(stock.transformer_blocks, fused.transformer_blocks)):
        gu = fb.img_mlp.gate_up
        ga, gb = gu.lora_A["default"].weight.grad, gu.lora_B["default"].weight.grad
        for j, part in enumerate(parts):
            rows = slice(0, n) if part == "gate_layer" else slice(n, 2 * n)
            sp = getattr(sb.img_mlp, part)
            assert_close(ga[j * r:(j + 1) * r], sp.lora_A["default"].weight.grad, TOL, f"{i} {part} grad A")
            assert_close(gb[rows, j * r:(j + 1) * r], sp.lora_B["default"].weight.grad, TOL, f"{i} {part} grad B")


@pytest.mark.kernel
@pytest.mark.parametrize("shape,n,rank,bias", [((2, 7), 600, 0, False), ((1, 13), 96, 3, True),
                                               ((3, 5), 520, 4, False)],
                         ids=["M14-N600", "M13-N96-r3-bias", "M15-N520-r4"])
def test_swiglu_triton_route_matches_torch_path_and_float64(shape, n, rank, bias, clean_backend):
    """The Triton gate (interpreter on CPU) against the torch path and a float64 run: output and every gradient,
    odd row counts and N not a multiple of the tile (masked edges; outputs NaN-filled first)."""
    from qwen_fused.kernels import set_backend
    from qwen_fused.kernels.swiglu import swiglu

    g = torch.Generator().manual_seed(0)
    c = 24
    args = dict(x=torch.randn(*shape, c, generator=g), weight=torch.randn(2 * n, c, generator=g) * c ** -0.5,
                bias=torch.randn(2 * n, generator=g) * 0.1 if bias else None,
                lora_a=torch.randn(rank, c, generator=g) if rank else None,
                lora_b=torch.randn(2 * n, rank, generator=g) * 0.1 if rank else None)
    dh = torch.randn(*shape, n, generator=g)

    def run(backend, dtype):
        set_backend(backend)
        leaves = {k: (v.to(dtype, copy=True).requires_grad_(True) if v is not None else None)
                  for k, v in args.items()}
        out = swiglu(**leaves, lora_scale=0.5 if rank else 1.0)
        out.backward(dh.to(dtype))
        return out, {k: v.grad for k, v in leaves.items() if v is not None}

    ref, ref_grads = run("torch", torch.float64)
    for backend in ("torch", "triton"):
        out, grads = run(backend, torch.float32)
        assert_close(out, ref, TOL, f"{backend} output")
        for k, grad in grads.items():
            assert_close(grad, ref_grads[k], TOL, f"{backend} grad {k}")


def test_diffusers_lora_api_on_fused_model_round_trips_with_stock(tmp_path):
    """diffusers' save_lora_adapter / load_lora_adapter (bound on the fused model by fuse_qkv): a stock 2.1 LoRA on
    to_q/k/v and the MLP loads onto the fused model with stock's output, and what the fused model saves loads
    into a stock model as the same adapter."""
    from peft import LoraConfig

    stock, fused = _pair()
    stock.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "img_mlp.gate_layer"],
                                 init_lora_weights=False))
    # weight_name: the bound loader does not default to safetensors for a folder (it looks for the .bin)
    name = "pytorch_lora_weights.safetensors"
    stock.save_lora_adapter(tmp_path / "stock")
    fused.load_lora_adapter(tmp_path / "stock", prefix=None, weight_name=name, adapter_name="default")
    fused.save_lora_adapter(tmp_path / "fused")
    again = random_transformer()
    again.load_lora_adapter(tmp_path / "fused", prefix=None, weight_name=name)
    kw = random_inputs(stock, text=(3, 2), pad=(0, 1))
    with torch.no_grad():
        ref = _run(stock, kw, False)
        assert_close(_run(fused, kw, False), ref, TOL, "fused with the stock LoRA")
        assert_close(_run(again, kw, False), ref, 0.0, "stock with the fused model's saved LoRA")
        assert (ref - _run(random_transformer(), kw, False)).abs().max() > 1e-3 * ref.abs().max()  # LoRA matters
