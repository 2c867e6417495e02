"""Qwen-Image 2.1 bench cases (issue 20): the `q21-` shapes at op, block and model level.

Same providers, verification and timing as Qwen-Image's cases (`workloads.py`, `model_level.py`); what differs is
asked of the family (`qwen_fused.families.qwenimage21`: sizes, LoRA targets, RoPE hook) or built by its tiny
builder (`tiny21`: random weights, inputs laid out as `QwenImage21Pipeline` does). Op and block inputs are what
the model itself hands its first block (a pre-hook on block 0 catches them), so RoPE, the block-causal segments
and the modulation rows come from diffusers' own preamble, not from a copy of it here.

op     the QKV stage of one 2.1 block: stock `_qwenimage21_prepare_qkv` (to_q/k/v, QK RMSNorm, RoPE) against the
       fused processor's projection call (`fused_qkv_21`: one merged GEMM, norm and RoPE in the epilogue)
block  one `QwenImage21TransformerBlock`
model  the whole transformer (`Setup21` below, run by `model_level.py`)
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from qwen_fused.families import qwenimage21 as FAMILY
from qwen_fused.families.tiny21 import random_inputs, random_transformer, rope_axes

from .cases import SHAPES21, TINY_DIMS, TINY_SEQ_DIV, block_cost
from .model_level import Setup, fuse_keeping_lora
from .workloads import add_lora, draw_lora, merged_lora

TINY_SIDE_DIV = 8  # reduced sizes: each latent image side / 8 (its tokens / 64, as TINY_SEQ_DIV for the text)
# a stock LoRA's targets: the family's (fused) training targets with each merged projection as its stock parts
STOCK_LORA_TARGETS = [p for t in FAMILY.LORA_TARGETS for p in FAMILY.STREAMS.get(t, (t,))]
OURS_LORA_TARGETS = list(FAMILY.LORA_TARGETS)
# block level: the LoRA goes on by module (`add_lora`), which a merged gate_up does not take; the model level
# loads it through `load_lora` (Setup21.fuse_extra)
SWIGLU_TRAIN = "block level: a LoRA on gate_layer/proj goes on the merged SwiGLU only through load_lora (model level)"


def dims(tiny):
    return (TINY_DIMS["heads"], TINY_DIMS["head_dim"]) if tiny else (FAMILY.HEADS, FAMILY.HEAD_DIM)


def layout(shape, tiny):
    """(text runs, images) of a `q21-` shape: the real one, or reduced (every image keeps whole 2x2 slots)."""
    spec = SHAPES21[shape]
    text, images = spec["text"], spec["images"]
    if tiny:
        text = tuple(max(1, t // TINY_SEQ_DIV) for t in text)
        images = tuple((f, max(2, h // TINY_SIDE_DIV), max(2, w // TINY_SIDE_DIV)) for f, h, w in images)
    return text, images


def model_config(tiny, n_layers):
    heads, head_dim = dims(tiny)
    in_ch, ctx = (8, 16) if tiny else (FAMILY.IN_CHANNELS, FAMILY.CONTEXT_DIM)
    return dict(num_layers=n_layers, attention_head_dim=head_dim, num_attention_heads=heads, in_channels=in_ch,
                out_channels=in_ch, context_in_dim=ctx, mlp_ratio=3, axes_dims_rope=rope_axes(head_dim))


def model_inputs(config, text, images, batch, device, dtype, seed):
    """`forward` kwargs (one condition image per run of text but the last; timestep 0.5) on `device` in `dtype`."""
    cfg = SimpleNamespace(config=SimpleNamespace(**config))
    kw = random_inputs(cfg, batch=batch, text=text, conditions=images[:-1], target=images[-1], seed=seed)
    kw["timestep"] = torch.full((batch,), 0.5)
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in kw.items()}


def case_cost(w):
    """Lower bounds of one case's FLOPs and bytes (each weight and activation read once), from its sizes `w`
    (`.case .dim .s_img .s_txt .dtype .tiny`). Attention counts only the target's rows (they see the whole
    sequence); the prefix's block-causal rows are left out, so it stays a floor."""
    c, C = w.case, w.dim
    e = torch.finfo(w.dtype).bits // 8
    S = w.s_img + w.s_txt
    M = c.batch * S
    if c.level == "op":
        N, r = 3 * C, c.rank
        flops = 2 * M * C * N + (2 * M * r * (C + N) if r else 0)
        nbytes = e * (M * C + N * C + M * N)
        if c.mode == "fwdbwd":  # dX = dY W and the LoRA grads; frozen W, so no dW
            flops += 2 * M * N * C + 4 * M * r * (C + N)
            nbytes += e * (M * N + N * C + 2 * M * C)
        return {"flops": int(flops), "bytes": int(nbytes)}
    f, h, wd = layout(c.shape, w.tiny)[1][-1]
    lin = 2 * M * C * 13 * C                 # qkv 3C + out C + SwiGLU 6C + 3C per token
    att = 4 * c.batch * f * h * wd * S * C   # QK^T and PV of the target's rows
    weights = e * 13 * C * C
    acts = e * 2 * M * C
    return block_cost(c, lin, att, weights, acts)


def block_inputs(model, inputs):
    """The kwargs `model.forward` hands its first block (diffusers' preamble: RoPE, modulation, segments)."""
    caught = {}

    class _Stop(Exception):
        pass

    def hook(_mod, args, kwargs):
        caught.update(kwargs)
        raise _Stop

    handle = model.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught


# ------------------------------------------------------------------------------------------ op and block
class Workload21:
    """What all providers of one 2.1 op or block case share (the `Workload` interface the runner reads)."""

    def __init__(self, case, device, dtype=torch.bfloat16, tiny=False, seed=0, l2_bytes=50 << 20):
        import qwen_fused

        self.case, self.device, self.dtype, self.tiny = case, torch.device(device), dtype, tiny
        self.heads, self.head_dim = dims(tiny)
        self.dim = self.heads * self.head_dim
        text, images = layout(case.shape, tiny)
        self.s_img, self.s_txt = sum(f * h * w for f, h, w in images), sum(text)
        self.ref_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        self.train = case.mode == "fwdbwd"
        cfg = model_config(tiny, 1)
        ref = random_transformer(seed, device=self.device, dtype=self.ref_dtype, **cfg).requires_grad_(False)
        base = random_transformer(seed, device=self.device, dtype=dtype, **cfg).requires_grad_(False)
        kw = model_inputs(cfg, text, images, case.batch, self.device, self.ref_dtype, seed + 2)
        caught = block_inputs(ref, kw)
        self.ref_rope = caught.pop("rotary_emb")
        self.stock_rope = block_inputs(base, {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point()
                                              else v for k, v in kw.items()})["rotary_emb"]
        self.fused_rope = FAMILY.POS_EMBED_HOOK(None, (), self.stock_rope)
        caught.pop("hidden_states")
        self.modulation = caught.pop("modulation").to(dtype)  # an input of the block, rounded like x
        self.block_kw = caught  # segments, target_token_mask, key_valid, ...
        self.lora = draw_lora(ref, case.rank, seed, STOCK_LORA_TARGETS) if self.train else {}
        self.fused_model = qwen_fused.fuse_qkv(copy.deepcopy(base))
        if self.train:
            add_lora(ref, STOCK_LORA_TARGETS, self.lora, case.rank, self.ref_dtype)
            add_lora(base, STOCK_LORA_TARGETS, self.lora, case.rank, dtype)
            add_lora(self.fused_model, OURS_LORA_TARGETS, merged_lora(self.lora), case.rank, dtype)
        self.ref_model, self.stock_model = ref, base
        self.op_weight = self.fused_model.transformer_blocks[0].attn.to_qkv.base_layer.weight if self.train \
            else self.fused_model.transformer_blocks[0].attn.to_qkv.weight

        g = torch.Generator(device=self.device).manual_seed(seed + 3)
        B, S, C = case.batch, self.s_img + self.s_txt, self.dim
        n_sets = 1 if tiny else min(8, max(2, -(-3 * l2_bytes // (B * S * C * torch.finfo(dtype).bits // 8))))

        def rnd(*shape, grad=False):
            return torch.randn(*shape, generator=g, device=self.device, dtype=dtype).requires_grad_(grad)

        xgrad = self.train and case.level == "op"  # as Qwen-Image's: the op's dX feeds upstream LoRA
        self.inputs = [dict(x=rnd(B, S, C, grad=xgrad)) for _ in range(n_sets)]
        if case.level == "op":
            self.grad_out = [rnd(B, S, self.heads, self.head_dim) for _ in range(3)]
            self.gemm_grad_out = [rnd(B, S, 3 * C)]
        else:
            self.grad_out = [rnd(B, S, C)]

    def input_grads(self):
        return [t for inp in self.inputs for t in inp.values() if t.requires_grad]

    def release_reference(self):
        self.ref_model = None

    def _collect(self, step, params):
        from .workloads import Workload

        return Workload._collect(self, step, params)


def _grad_ctx(train):
    return torch.enable_grad() if train else torch.no_grad()


def _stepper(w, fn, dtype):
    def step(inp):
        with _grad_ctx(w.train):
            outs = fn(inp["x"].to(dtype))
            outs = outs if isinstance(outs, tuple) else (outs,)
            if w.train:
                torch.autograd.backward(outs, [g.to(dtype) for g in w.grad_out])
        return outs
    return step


def _op(w, model, rope, fused, compiled, dtype):
    from diffusers.models.transformers.transformer_qwenimage21 import _qwenimage21_prepare_qkv

    from qwen_fused.families.qwenimage21_processor import fused_qkv_21

    attn = model.transformer_blocks[0].attn
    if fused:
        fn = lambda x: tuple(fused_qkv_21(attn, x, rope))  # noqa: E731
    else:
        fn = lambda x: tuple(_qwenimage21_prepare_qkv(attn, x, rope, None, None, None)[:3])  # noqa: E731
    return _stepper(w, torch.compile(fn) if compiled else fn, dtype)


def _block(w, model, rope, compiled, dtype):
    blk = model.transformer_blocks[0]
    run = torch.compile(blk) if compiled else blk
    mod = w.modulation.to(dtype)

    def fn(x):
        if w.case.gc:
            return torch.utils.checkpoint.checkpoint(run, x, mod, rope, use_reentrant=False, **w.block_kw)
        return run(x, mod, rope, **w.block_kw)
    return _stepper(w, fn, dtype)


def build(w, kind, compiled=False, dtype=None):
    """(step, model) of one provider kind: "ref", "stock", "ours" or "swiglu" (ours + `fuse_swiglu`)."""
    import qwen_fused

    from .providers import Unavailable

    dtype = dtype or w.dtype
    model, rope = {"ref": (w.ref_model, w.ref_rope), "stock": (w.stock_model, w.stock_rope),
                   "ours": (w.fused_model, w.fused_rope), "swiglu": (w.fused_model, w.fused_rope)}[kind]
    if kind == "swiglu":
        if w.case.level == "op":
            raise Unavailable("the merged SwiGLU is a block- and model-level provider")
        if w.train:
            raise Unavailable(SWIGLU_TRAIN)
        model = qwen_fused.fuse_swiglu(copy.deepcopy(model))
    if w.case.level == "op":
        return _op(w, model, rope, kind != "stock" and kind != "ref", compiled, dtype), model
    return _block(w, model, rope, compiled, dtype), model


def gemm_step(w):
    """The bare merged GEMM x W_qkv^T (the op's ceiling on cuBLAS)."""
    def step(inp):
        with _grad_ctx(w.train):
            outs = (F.linear(inp["x"], w.op_weight),)
            if w.train:
                torch.autograd.backward(outs, w.gemm_grad_out)
        return outs
    return step


# ------------------------------------------------------------------------------------------------ model
class Setup21(Setup):
    """`model_level.Setup` for a `q21-` shape: the 2.1 transformer and its inputs."""

    lora_targets = STOCK_LORA_TARGETS
    extra_group = ("ours-swiglu", "ours-swiglu-compile")  # after ours: `fuse_swiglu` on top

    def __init__(self, case, device, tiny, blocks, seed=0, dtype=torch.bfloat16):
        self.case, self.device, self.tiny, self.blocks, self.dtype = case, torch.device(device), tiny, blocks, dtype
        self.heads, self.head_dim = dims(tiny)
        self.dim = self.heads * self.head_dim
        text, images = layout(case.shape, tiny)
        self.img_shapes = [list(images)] * case.batch
        self.s_img, self.s_txt = sum(f * h * w for f, h, w in images), sum(text)
        self.train = case.mode == "fwdbwd"
        self.config = model_config(tiny, 1)
        self.inputs = dict(model_inputs(self.config, text, images, case.batch, self.device, dtype, seed + 2),
                           return_dict=False)
        g = torch.Generator(device=self.device).manual_seed(seed + 2)
        # the output covers the joint sequence (text, condition images, target)
        self.grad_out = torch.randn(case.batch, self.s_img + self.s_txt, self.config["out_channels"], generator=g,
                                    device=self.device, dtype=dtype)

    def build(self, n_layers, seed=0):
        return random_transformer(seed, dtype=self.dtype, device=self.device,
                                  **dict(self.config, num_layers=n_layers)).requires_grad_(False)

    @staticmethod
    def fuse_extra(model, lora=None):
        """`fuse_swiglu`, which takes no adapters on the parts it merges: the LoRA comes off and goes back on
        through `load_lora` (stock's `gate_layer`/`proj` LoRA becomes one block-diagonal `gate_up` adapter)."""
        import qwen_fused

        if lora is not None:
            model.unload_lora()
        return fuse_keeping_lora(model, qwen_fused.fuse_swiglu, lora)
