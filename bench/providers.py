"""Benchmark providers: the ways of running a case (stock diffusers eager, stock under torch.compile, ours with
Triton, ours on the torch path, ours under torch.compile, ours with the fused block forward of `fuse_blocks`, the
bare GEMM ceiling), each built on a `Workload`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from qwen_fused.kernels import set_backend
from qwen_fused.processor import pos_embed_hook

from .workloads import Params, Workload, merged_lora, stock_qkv

class Unavailable(Exception):
    """A provider that cannot run here (no CUDA, no Triton backend yet, level not supported)."""


def use_backend(name: str | None) -> None:
    """Select the kernels backend for the provider about to run."""
    if name is None:
        return
    try:
        set_backend(name)
    except Exception as e:  # noqa: BLE001 - any refusal means this backend cannot run here
        raise Unavailable(f"set_backend({name!r}) failed: {e}") from e


def use_backend_reset() -> None:
    """Back to the default backend after a provider, so the next one starts from a known state."""
    set_backend(None)


@dataclass
class Impl:
    """One provider's runnable form of a case."""
    step: Callable[[dict], Any]            # the timed unit of work on one input set
    collect: Callable[[dict], dict] | None  # runs step, returns named outputs and gradients (None: not verified)
    backend: str | None = None             # kernels backend to select before running
    grads: list = field(default_factory=list)  # tensors whose .grad do_bench resets between runs
    compiled: bool = False


def _maybe_compile(fn, compiled):
    return torch.compile(fn) if compiled else fn


# ------------------------------------------------------------------------------------------------ providers
def _grad_ctx(train):
    return torch.enable_grad() if train else torch.no_grad()


def _op_stock(w: Workload, model, compiled=False, dtype=None):
    attn = model.transformer_blocks[0].attn
    dtype = dtype or w.dtype
    fn = _maybe_compile(lambda xi, xt: stock_qkv(attn, xi, xt, w.img_freqs, w.txt_freqs), compiled)

    def step(inp):
        with _grad_ctx(w.train):
            outs = fn(inp["x_img"].to(dtype), inp["x_txt"].to(dtype))
            if w.train:
                torch.autograd.backward(outs, [g.to(dtype) for g in w.grad_out])
        return outs
    params = Params(model=model)
    return step, params


def _op_ours(w: Workload, compiled=False):
    from qwen_fused.kernels import joint_qkv, rope_tables

    cos_i, sin_i = rope_tables(w.img_freqs)
    cos_t, sin_t = rope_tables(w.txt_freqs)
    streams = {"img": dict(w.op_weights["img"], cos=cos_i, sin=sin_i),
               "txt": dict(w.op_weights["txt"], cos=cos_t, sin=sin_t)}
    tensors = {}
    if w.train:
        merged = merged_lora(w.lora)
        for s, name in (("img", "to_qkv"), ("txt", "add_qkv_proj")):
            key = f"transformer_blocks.0.attn.{name}"
            a, b = (t.to(w.device, w.dtype).requires_grad_(True) for t in merged[key])
            streams[s].update(lora_a=a, lora_b=b, lora_scale=1.0)
            tensors[f"{key}.lora_A.default.weight"], tensors[f"{key}.lora_B.default.weight"] = a, b
    fn = _maybe_compile(lambda xi, xt: joint_qkv(dict(streams["txt"], x=xt), dict(streams["img"], x=xi),
                                                 heads=w.heads, eps=1e-6), compiled)

    def step(inp):
        with _grad_ctx(w.train):
            outs = fn(inp["x_img"], inp["x_txt"])
            if w.train:
                torch.autograd.backward(outs, w.grad_out)
        return outs
    return step, Params(tensors=tensors)


def _op_gemm(w: Workload):
    wi, wt = w.op_weights["img"]["weight"], w.op_weights["txt"]["weight"]

    def step(inp):
        with _grad_ctx(w.train):
            outs = (F.linear(inp["x_img"], wi), F.linear(inp["x_txt"], wt))
            if w.train:
                torch.autograd.backward(outs, w.gemm_grad_out)
        return outs
    return step


def _run_blocks(blocks, inp, rope, gc, dtype):
    h, e, temb = inp["x_img"].to(dtype), inp["x_txt"].to(dtype), inp["temb"].to(dtype)
    for blk in blocks:
        if gc:
            e, h = torch.utils.checkpoint.checkpoint(blk, h, e, None, temb, rope, use_reentrant=False)
        else:
            e, h = blk(h, e, None, temb, rope)
    return e, h


def _blocks_provider(w: Workload, model, rope, compiled=False, dtype=None):
    dtype = dtype or w.dtype
    blocks = [torch.compile(b) if compiled else b for b in model.transformer_blocks]

    def step(inp):
        with _grad_ctx(w.train):
            outs = _run_blocks(blocks, inp, rope, w.case.gc, dtype)
            if w.train:
                torch.autograd.backward(outs, [g.to(dtype) for g in w.grad_out])
        return outs
    return step, Params(model=model)


def _fused_rope(w):
    # what fuse_qkv's pos_embed hook hands every block: the real [S, 2, D//2] tables, made once per forward
    return pos_embed_hook(None, (), (w.img_freqs, w.txt_freqs))


def _impl(w, step, params, backend=None, compiled=False):
    return Impl(step=step, collect=w._collect(step, params), backend=backend,
                grads=params() + w.input_grads(), compiled=compiled)


def _impl21(w, kind, compiled=False, backend=None):
    """A 2.1 op or block provider (bench/family21.py)."""
    from .family21 import build

    step, model = build(w, kind, compiled)
    return _impl(w, step, Params(model=model), backend=backend, compiled=compiled)


def build_stock(w: Workload, compiled=False):
    if w.case.family == "qwenimage21":
        return _impl21(w, "stock", compiled)
    if w.case.level == "op":
        step, params = _op_stock(w, w.stock_model, compiled)
    else:
        step, params = _blocks_provider(w, w.stock_model, (w.img_freqs, w.txt_freqs), compiled)
    return _impl(w, step, params, compiled=compiled)


def build_reference(w: Workload):
    """Stock at reference precision (fp32 on CUDA without TF32, float64 on CPU): the yardstick for all."""
    if w.ref_model is None:
        raise RuntimeError("reference model already released")
    if w.case.family == "qwenimage21":
        from .family21 import build

        step, model = build(w, "ref", dtype=w.ref_dtype)
        params = Params(model=model)
    elif w.case.level == "op":
        step, params = _op_stock(w, w.ref_model, dtype=w.ref_dtype)
    else:
        step, params = _blocks_provider(w, w.ref_model, (w.img_freqs, w.txt_freqs), dtype=w.ref_dtype)

    def collect(inp):
        # inputs upcast as leaves so their gradients are those of the reference
        ref_inp = {k: v.detach().to(w.ref_dtype).requires_grad_(v.requires_grad) for k, v in inp.items()}
        return w._collect(step, params)(ref_inp)
    return Impl(step=step, collect=collect)


def build_ours(w: Workload, backend, compiled=False):
    if backend == "triton" and w.device.type != "cuda":
        raise Unavailable("the Triton backend needs a CUDA device")
    use_backend(backend)
    if w.case.family == "qwenimage21":
        return _impl21(w, "ours", compiled, backend)
    if w.case.level == "op":
        step, params = _op_ours(w, compiled)
    else:
        step, params = _blocks_provider(w, w.fused_model, _fused_rope(w), compiled)
    return _impl(w, step, params, backend=backend, compiled=compiled)


def build_ours_blocks(w: Workload, compiled=False):
    """Ours with `fuse_blocks` too, on its own copy of the fused model (the other providers keep theirs)."""
    import qwen_fused

    if w.case.level == "op":
        raise Unavailable("the fused block forward is a block- and model-level provider")
    use_backend("auto")
    model = qwen_fused.fuse_blocks(copy.deepcopy(w.fused_model))
    step, params = _blocks_provider(w, model, _fused_rope(w), compiled)
    return _impl(w, step, params, backend="auto", compiled=compiled)


def build_ours_swiglu(w, compiled=False):
    """2.1: ours with the merged SwiGLU (`fuse_swiglu`) too, on its own copy of the fused model."""
    use_backend("auto")
    return _impl21(w, "swiglu", compiled, "auto")


def build_gemm(w: Workload):
    if w.case.level != "op":
        raise Unavailable("the bare GEMM ceiling is an op-level provider")
    if w.device.type != "cuda":  # a CPU GEMM can be slower than the fused op: no ceiling there
        raise Unavailable("the bare GEMM is a ceiling on CUDA (cuBLAS) only")
    if w.case.family == "qwenimage21":
        from .family21 import gemm_step

        return Impl(step=gemm_step(w), collect=None, grads=w.input_grads())
    step = _op_gemm(w)
    return Impl(step=step, collect=None, grads=w.input_grads())


@dataclass(frozen=True)
class Provider:
    name: str
    label: str
    build: Callable[[Workload], Impl]
    cpu_default: bool = True
    families: tuple = ("qwenimage", "qwenimage21")  # the model families (Case.family) it runs; others skip it


PROVIDERS = {p.name: p for p in [
    Provider("stock", "stock diffusers eager (+peft LoRA)", build_stock),
    Provider("stock-compile", "stock, torch.compile per block", lambda w: build_stock(w, compiled=True), False),
    Provider("ours-triton", "ours, Triton kernels", lambda w: build_ours(w, "triton")),
    Provider("ours-torch", "ours, torch path", lambda w: build_ours(w, "torch")),
    Provider("ours-compile", "ours under torch.compile", lambda w: build_ours(w, "auto", compiled=True), False),
    Provider("ours-blocks", "ours + fuse_blocks (Triton on CUDA, torch path elsewhere)", build_ours_blocks,
             families=("qwenimage",)),
    Provider("ours-blocks-compile", "ours + fuse_blocks under torch.compile",
             lambda w: build_ours_blocks(w, compiled=True), False, families=("qwenimage",)),
    Provider("ours-swiglu", "ours + merged SwiGLU (fuse_swiglu; Triton on CUDA, torch path elsewhere)",
             build_ours_swiglu, families=("qwenimage21",)),
    Provider("ours-swiglu-compile", "ours + merged SwiGLU under torch.compile",
             lambda w: build_ours_swiglu(w, compiled=True), False, families=("qwenimage21",)),
    Provider("gemm", "bare cuBLAS GEMM x W_qkv^T (ceiling)", build_gemm, False),
]}
BASELINES = ("stock", "stock-compile")


def select_providers(names=None, cuda=True) -> list[str]:
    if names:
        bad = [n for n in names if n not in PROVIDERS]
        if bad:
            raise ValueError(f"unknown provider(s) {', '.join(bad)}; known: {', '.join(PROVIDERS)}")
        names = list(names)
        if "stock" not in names:  # every ratio and every verification tolerance is relative to stock eager
            names.insert(0, "stock")
        return names
    return [n for n, p in PROVIDERS.items() if cuda or (p.cpu_default and n != "ours-triton")]
