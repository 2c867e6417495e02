"""Fused transformer vs stock diffusers: forward, every gradient, unfuse, errors (fp32, CPU)."""
import copy
import types

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from helpers import assert_close, clone_inputs, merged_view, tiny_config, tiny_inputs, tiny_transformer

import qwen_fused
from qwen_fused import FusedQwenAttnProcessor

TOL = 1e-5

CASES = [
    # id, model kwargs, input kwargs
    pytest.param(dict(heads=2, head_dim=128), dict(batch=1, txt_len=7), id="H2xD128-B1-T7-1img"),
    pytest.param(dict(heads=3, head_dim=32), dict(batch=3, txt_len=9, valid_lens=(9, 4, 1)),
                 id="H3xD32-B3-mask"),
    pytest.param(dict(heads=3, head_dim=32), dict(batch=2, txt_len=1, img_shapes=((1, 3, 5),)),
                 id="H3xD32-B2-T1-odd-grid"),
    pytest.param(dict(heads=2, head_dim=32), dict(batch=2, txt_len=5, img_shapes=((1, 2, 3), (1, 3, 3), (1, 2, 5),
                                                                                   (1, 1, 7)), valid_lens=(2, 5)),
                 id="H2xD32-B2-3edits-mask"),
    pytest.param(dict(heads=3, head_dim=32, zero_cond_t=True),
                 dict(batch=2, txt_len=6, img_shapes=((1, 4, 4), (1, 2, 6)), valid_lens=(6, 3)),
                 id="H3xD32-zero_cond_t"),
]


def _run(model, kw):
    out = model(**kw).sample
    # weight the output so every element's gradient differs
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    loss.backward()
    return out


@pytest.mark.parametrize("model_kw,input_kw", CASES)
def test_forward_and_gradients_match_stock(model_kw, input_kw):
    stock = tiny_transformer(**model_kw)
    fused = qwen_fused.fuse_qkv(copy.deepcopy(stock))
    kw = tiny_inputs(requires_grad=True, **input_kw)
    kw2 = clone_inputs(kw)
    ref = _run(stock, kw)
    out = _run(fused, kw2)
    assert_close(out, ref, TOL, "output")
    assert_close(kw2["hidden_states"].grad, kw["hidden_states"].grad, TOL, "grad hidden_states")
    assert_close(kw2["encoder_hidden_states"].grad, kw["encoder_hidden_states"].grad, TOL,
                 "grad encoder_hidden_states")
    stock_grads = merged_view({n: p.grad for n, p in stock.named_parameters()})
    fused_grads = {n: p.grad for n, p in fused.named_parameters()}
    assert stock_grads.keys() == fused_grads.keys()
    for name, g in fused_grads.items():
        if stock_grads[name] is None:  # the last block's text stream does not reach the output
            assert g is None, name
            continue
        assert g is not None, f"no gradient for {name}"
        if stock_grads[name].abs().max() == 0:
            assert g.abs().max() == 0, name
            continue
        assert_close(g, stock_grads[name], TOL, f"grad {name}")


def test_layout_after_fuse_and_exact_unfuse():
    model = tiny_transformer(heads=3, head_dim=32)
    model.transformer_blocks[1].attn.add_k_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not qwen_fused.is_fused(model)
    assert qwen_fused.fuse_qkv(model) is model
    assert qwen_fused.is_fused(model)
    for block in model.transformer_blocks:
        attn = block.attn
        for gone in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            assert not hasattr(attn, gone)
        assert isinstance(attn.processor, FusedQwenAttnProcessor)
        assert attn.to_qkv.weight.shape == (3 * 96, 96) and attn.add_qkv_proj.bias.shape == (3 * 96,)
    sd = model.state_dict()
    torch.testing.assert_close(sd["transformer_blocks.0.attn.to_qkv.weight"],
                               torch.cat([before[f"transformer_blocks.0.attn.to_{p}.weight"] for p in "qkv"]),
                               rtol=0, atol=0)
    # a partly frozen stream stays trainable as a whole (any part trainable)
    assert model.transformer_blocks[1].attn.add_qkv_proj.weight.requires_grad

    qwen_fused.unfuse_qkv(model)
    assert not qwen_fused.is_fused(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(type(b.attn.processor) is QwenDoubleStreamAttnProcessor2_0 for b in model.transformer_blocks)
    assert not model.pos_embed._forward_hooks


def test_keeps_dtype_device_requires_grad_and_frees_old_params():
    model = tiny_transformer(heads=2, head_dim=32, dtype=torch.float16)
    model.requires_grad_(False)
    old = model.transformer_blocks[0].attn.to_q.weight
    qwen_fused.fuse_qkv(model)
    w = model.transformer_blocks[0].attn.to_qkv.weight
    assert w.dtype == torch.float16 and w.device.type == "cpu" and not w.requires_grad
    assert all(p is not old for p in model.parameters())


def test_meta_device_model_fuses_without_allocating():
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**tiny_config(heads=2, head_dim=32))
    qwen_fused.fuse_qkv(model)
    assert model.transformer_blocks[0].attn.to_qkv.weight.is_meta
    qwen_fused.unfuse_qkv(model)
    assert model.transformer_blocks[0].attn.to_q.weight.is_meta


def test_pipeline_input_and_attention_backend_kept():
    model = tiny_transformer(heads=2, head_dim=32)
    for block in model.transformer_blocks:
        block.attn.processor._attention_backend = "native"
    pipe = types.SimpleNamespace(transformer=model)
    assert qwen_fused.fuse_qkv(pipe) is model
    assert all(b.attn.processor._attention_backend == "native" for b in model.transformer_blocks)
    assert qwen_fused.is_fused(pipe)
    qwen_fused.unfuse_qkv(pipe)
    assert all(b.attn.processor._attention_backend == "native" for b in model.transformer_blocks)


def test_fusing_twice_or_wrong_model_raises():
    model = qwen_fused.fuse_qkv(tiny_transformer(heads=2, head_dim=32))
    with pytest.raises(ValueError, match="already fused"):
        qwen_fused.fuse_qkv(model)
    with pytest.raises(TypeError, match="QwenImageTransformer2DModel"):
        qwen_fused.fuse_qkv(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="QwenImageTransformer2DModel"):
        qwen_fused.fuse_qkv(types.SimpleNamespace(transformer=torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="not fused"):
        qwen_fused.unfuse_qkv(tiny_transformer(heads=2, head_dim=32))


def test_peft_adapter_on_qkv_is_refused_with_advice():
    from peft import LoraConfig

    model = tiny_transformer(heads=2, head_dim=32)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="load_lora"):
        qwen_fused.fuse_qkv(model)
    after = model.state_dict()  # nothing changed
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_blocks_compile_fullgraph_same_output():
    stock = tiny_transformer(heads=2, head_dim=32, layers=1)
    fused = qwen_fused.fuse_qkv(copy.deepcopy(stock))
    kw = tiny_inputs(batch=2, txt_len=5, valid_lens=(5, 3))
    with torch.no_grad():
        ref = stock(**clone_inputs(kw)).sample
        torch._dynamo.reset()
        for block in fused.transformer_blocks:
            block.compile(fullgraph=True, backend="aot_eager")
        out = fused(**clone_inputs(kw)).sample
    assert_close(out, ref, TOL, "compiled output")


def test_old_projections_are_freed_as_fusing_goes(monkeypatch):
    """Peak memory grows by one stream's projections, not by the model: by the time the next stream is merged,
    the previous stream's q/k/v tensors are gone."""
    import gc
    import weakref

    from qwen_fused import fuse

    model = tiny_transformer(heads=2, head_dim=32, layers=3)
    seen = []
    merged_linear = fuse._merged_linear

    def watching(parts):
        gc.collect()
        alive = [name for name, ref in seen if ref() is not None]
        assert not alive, f"still alive while merging the next stream: {alive}"
        seen.extend((f"{id(p)}.{n}", weakref.ref(getattr(p, n))) for p in parts for n in ("weight", "bias"))
        return merged_linear(parts)

    monkeypatch.setattr(fuse, "_merged_linear", watching)
    qwen_fused.fuse_qkv(model)
    assert len(seen) == 3 * 2 * 3 * 2  # blocks x streams x q/k/v x (weight, bias)
    gc.collect()
    assert all(ref() is None for _, ref in seen)


def test_hooks_on_the_projections_are_refused():
    """Layerwise casting (and accelerate offload) hooks sit on to_q/k/v: fusing would drop them silently."""
    model = tiny_transformer(heads=2, head_dim=32)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="before enabling them"):
        qwen_fused.fuse_qkv(model)
    assert hasattr(model.transformer_blocks[0].attn, "to_q")  # untouched


# every public way to get a fused model, each in a fresh interpreter that imports only that module
_FUSE_PATHS = {
    "qwen_fused.fuse_qkv": "import qwen_fused\nfuse = qwen_fused.fuse_qkv\n",
    "qwen_fused.fuse.fuse_qkv": "from qwen_fused.fuse import fuse_qkv as fuse\n",
    "qwen_fused.checkpoint.from_pretrained": (
        "import tempfile\nfrom qwen_fused.checkpoint import from_pretrained\n"
        "def fuse(m):\n"
        "    with tempfile.TemporaryDirectory() as folder:\n"
        "        m.save_pretrained(folder)\n"
        "        return from_pretrained(folder)\n"),
}


@pytest.mark.parametrize("path", list(_FUSE_PATHS))
def test_every_public_fuse_path_binds_the_lora_api(path):
    """A fused model always carries diffusers' LoRA API for the merged layout (else diffusers' loaders silently
    drop q/k/v), however it was fused, and without anything having imported the LoRA layer first: fuse.py may not
    import it, the package root registers it (qwen_fused/bindings.py)."""
    import subprocess
    import sys

    code = _FUSE_PATHS[path] + (
        "import sys\n"
        "from diffusers import QwenImageTransformer2DModel\n"
        "from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin\n"
        "lora_modules = [m for m in sys.modules if m.split('.')[:2] == ['qwen_fused', 'lora']]\n"
        "assert not lora_modules, 'LoRA layer imported first'\n"
        "model = fuse(QwenImageTransformer2DModel(num_layers=1, num_attention_heads=1, attention_head_dim=16,\n"
        "                                         joint_attention_dim=16, in_channels=16, axes_dims_rope=(4, 6, 6)))\n"
        "from qwen_fused import is_fused, unfuse_qkv\n"
        "from qwen_fused.lora import add_lora, fused_load_lora_adapter, fused_save_lora_adapter\n"
        "assert is_fused(model)\n"
        "for name, impl in [('load_lora_adapter', fused_load_lora_adapter), ('add_adapter', add_lora),\n"
        "                   ('save_lora_adapter', fused_save_lora_adapter)]:\n"
        "    bound = getattr(model, name)\n"
        "    assert bound.func is impl and bound.args == (model,), (name, bound)\n"
        "assert QwenImageLoraLoaderMixin.save_lora_weights.__func__._qwen_fused\n"
        "unfuse_qkv(model)\n"
        "assert not {'load_lora_adapter', 'add_adapter', 'save_lora_adapter'} & set(vars(model))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_fuse_layer_does_not_import_the_lora_layer():
    """fuse.py sits below the LoRA layer: no import of qwen_fused.lora, not even inside a function."""
    import ast
    import pathlib

    from qwen_fused import fuse

    source = pathlib.Path(fuse.__file__).read_text()
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names += [f"{node.module or ''}.{a.name}" for a in node.names]
    assert "from . import bindings" in source and "import_module" not in source and "__import__" not in source
    assert not [n for n in names if "lora" in n.split(".")], names


def test_blocks_get_unit_stride_rope_tables():
    """The pos_embed hook hands the blocks cos/sin rows with unit inner stride (the kernel variant the op
    benchmark times), equal to the op's own `rope_tables` (issue 10)."""
    from qwen_fused.kernels import rope_tables
    from qwen_fused.processor import pos_embed_hook, stream_rope

    ang = torch.rand(11, 8, dtype=torch.float64) * 6
    freqs = torch.polar(torch.ones_like(ang), ang).to(torch.complex64)
    (table,) = pos_embed_hook(None, (), (freqs,))
    assert table.shape == (11, 2, 8)
    cos, sin = stream_rope(table)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    ref_cos, ref_sin = rope_tables(freqs)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
