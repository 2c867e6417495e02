"""Benchmark cases and providers.

A *case* is one workload (level, named shape, batch, mode, LoRA rank, checkpointing, blocks). A *provider*
is one way of running it (stock diffusers eager, stock under torch.compile, ours with Triton, ...). A
`Workload` holds what every provider of one case shares: the stock weights at reference precision, the
rotating input sets and the output gradients, so that all providers compute the same function on the same
data and can be checked against one reference before they are timed.

Levels
  op     the QKV stage of one block: both streams' projections + QK RMSNorm + RoPE + joint [text; image] layout
  block  one full QwenImageTransformerBlock
  model  N blocks of the real config run in sequence (per-block time x 60 is the full-model estimate)
Modes
  fwd     inference (no grad, no LoRA)
  fwdbwd  LoRA training step: forward + backward, base weights frozen, LoRA on the seed's default targets
"""
from __future__ import annotations

import copy
import fnmatch
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from qwen_fused._util import quiet_diffusers

# named shapes: (S_img, S_txt)
SHAPES = {
    "t2i-1328": (6889, 256),
    "edit-1024": (8192, 1024),
    "edit-1024x2": (12288, 600),
    "train-512": (2048, 400),
}
REAL_DIMS = dict(heads=24, head_dim=128)
TINY_DIMS = dict(heads=2, head_dim=32)
TINY_SEQ_DIV = 64  # reduced sizes without CUDA: sequence lengths divided by this
FULL_MODEL_BLOCKS = 60

STOCK_LORA_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                      "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"]
MERGED = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}
OURS_LORA_TARGETS = list(MERGED) + STOCK_LORA_TARGETS[6:]

QUICK_CASES = ["op/edit-1024/b1/fwd", "op/edit-1024/b1/fwdbwd-r64", "block/edit-1024/b1/fwd",
               "block/train-512/b1/fwdbwd-r32"]


class Unavailable(Exception):
    """A provider that cannot run here (no CUDA, no Triton backend yet, level not supported)."""


# ----------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    level: str            # op | block | model
    shape: str            # key of SHAPES
    batch: int = 1
    mode: str = "fwd"     # fwd | fwdbwd
    rank: int = 0         # LoRA rank (fwdbwd only)
    gc: bool = False      # gradient checkpointing per block (block/model fwdbwd)
    blocks: int = 1       # blocks run in sequence (model level)

    @property
    def name(self) -> str:
        mode = self.mode + (f"-r{self.rank}" if self.rank else "") + ("-gc" if self.gc else "")
        tail = f"/n{self.blocks}" if self.level == "model" else ""
        return f"{self.level}/{self.shape}/b{self.batch}/{mode}{tail}"

    @classmethod
    def parse(cls, name: str, blocks: int = 4) -> "Case":
        m = re.fullmatch(r"(op|block|model)/([\w.-]+?)/b(\d+)/(fwd|fwdbwd)(?:-r(\d+))?(-gc)?(?:/n(\d+))?", name)
        if not m or m.group(2) not in SHAPES:
            raise ValueError(f"cannot parse case {name!r}; expected LEVEL/SHAPE/bN/MODE[-rR][-gc][/nN] with SHAPE "
                             f"one of {', '.join(SHAPES)}, e.g. {QUICK_CASES[1]}")
        level, shape, b, mode, r, gc, n = m.groups()
        if mode == "fwdbwd" and not r:
            raise ValueError(f"case {name!r}: fwdbwd needs a LoRA rank, e.g. fwdbwd-r32")
        if level == "op" and gc:
            raise ValueError(f"case {name!r}: checkpointing applies to block and model levels")
        if mode == "fwd" and (r or gc):
            raise ValueError(f"case {name!r}: fwd is inference without LoRA or checkpointing")
        return cls(level, shape, int(b), mode, int(r or 0), bool(gc),
                   int(n) if n else (blocks if level == "model" else 1))


def all_cases(blocks: int = 4) -> list[Case]:
    """The full registry: every level x shape x batch x mode (x rank x checkpointing for training)."""
    out = []
    for level in ("op", "block", "model"):
        n = blocks if level == "model" else 1
        for shape in SHAPES:
            for batch in (1, 2):
                out.append(Case(level, shape, batch, "fwd", blocks=n))
                for rank in (32, 64):
                    for gc in ((False,) if level == "op" else (False, True)):
                        out.append(Case(level, shape, batch, "fwdbwd", rank, gc, n))
    return out


def select_cases(patterns=None, level=None, mode=None, quick=False, blocks=4) -> list[Case]:
    """Cases by name or glob (`--cases`), narrowed by `--level` / `--mode`; `quick` = the quick subset."""
    if quick and not patterns:
        patterns = QUICK_CASES
    registry = all_cases(blocks)
    if patterns:
        cases = []
        for pat in patterns:
            if any(ch in pat for ch in "*?["):
                hits = [c for c in registry if fnmatch.fnmatch(c.name, pat)]
                if not hits:
                    raise ValueError(f"--cases pattern {pat!r} matches no case")
                cases += hits
            else:
                cases.append(Case.parse(pat, blocks))
    else:
        cases = registry
    cases = [c for c in cases if (not level or c.level in level) and (not mode or c.mode in mode)]
    seen = set()
    return [c for c in cases if not (c.name in seen or seen.add(c.name))]


# ------------------------------------------------------------------------------------------ backend switch
def use_backend(name: str | None) -> None:
    """Select the kernels backend (`qwen_fused.kernels.set_backend`) for the provider about to run."""
    if name is None:
        return
    kernels = importlib.import_module("qwen_fused.kernels")
    setter = getattr(kernels, "set_backend", None)
    if setter is None:
        if name in ("torch", "auto"):
            return  # only the torch path exists yet
        raise Unavailable("qwen_fused.kernels has no set_backend yet (Triton kernels not merged)")
    try:
        setter(name)
    except Exception as e:  # noqa: BLE001 - any refusal means this backend cannot run here
        raise Unavailable(f"set_backend({name!r}) failed: {e}") from e


def use_backend_reset() -> None:
    """Back to the default backend after a provider, so the next one starts from a known state."""
    setter = getattr(importlib.import_module("qwen_fused.kernels"), "set_backend", None)
    if setter is not None:
        try:
            setter(None)
        except Exception:  # noqa: BLE001 - nothing to restore to
            pass


# ------------------------------------------------------------------------------------------------ workloads
def _build_model(n_layers, dims, device, seed):
    from diffusers import QwenImageTransformer2DModel

    d = dims["head_dim"]
    axes = (16, 56, 56) if d == 128 else (d // 4, 3 * d // 8, 3 * d // 8)
    torch.manual_seed(seed)
    with torch.device(device):
        model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=n_layers,
                                            attention_head_dim=d, num_attention_heads=dims["heads"],
                                            joint_attention_dim=16, axes_dims_rope=axes)
        with torch.no_grad():  # norm weights of exactly 1 would hide a missing weight multiply
            for blk in model.transformer_blocks:
                for norm in (blk.attn.norm_q, blk.attn.norm_k, blk.attn.norm_added_q, blk.attn.norm_added_k):
                    norm.weight.normal_(1.0, 0.1)
    return model.eval().requires_grad_(False)


def _rope(seq, head_dim, offset, device):
    """Complex RoPE freqs [seq, head_dim // 2] (unit modulus, position x inverse frequency)."""
    inv = 10000.0 ** (-torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))
    ang = torch.outer(torch.arange(offset, offset + seq, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64).to(device)


def draw_lora(model, rank, seed):
    """Random LoRA factors (fp32) for every stock target of `model`, A shared within each q/k/v group so the
    merged form (A, cat B) computes exactly the same function. B is nonzero so the LoRA path is live."""
    g = torch.Generator().manual_seed(seed + 1)
    factors = {}
    for name, mod in model.named_modules():
        target = next((t for t in STOCK_LORA_TARGETS if name == t or name.endswith("." + t)), None)
        if target is None or not isinstance(mod, torch.nn.Linear):
            continue
        a = torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5
        b = torch.randn(mod.out_features, rank, generator=g) * (0.5 / rank ** 0.5)
        factors[name] = [a, b]
    for prefix in {n.rsplit(".", 1)[0] for n in factors if n.endswith((".to_q", ".add_q_proj"))}:
        for parts in MERGED.values():
            names = [f"{prefix}.{p}" for p in parts]
            if all(n in factors for n in names):
                for n in names[1:]:
                    factors[n][0] = factors[names[0]][0]
    return factors


def merged_lora(factors):
    """Stock-target factors -> merged-target factors (A shared, B = cat of the q, k, v B's)."""
    out = {n: ab for n, ab in factors.items() if not any(n.endswith("." + p) for ps in MERGED.values() for p in ps)}
    for prefix in {n.rsplit(".", 1)[0] for n in factors if n.endswith((".to_q", ".add_q_proj"))}:
        for merged, parts in MERGED.items():
            names = [f"{prefix}.{p}" for p in parts]
            if all(n in factors for n in names):
                out[f"{prefix}.{merged}"] = [factors[names[0]][0], torch.cat([factors[n][1] for n in names])]
    return out


def add_lora(model, targets, factors, rank):
    """peft LoRA (alpha = rank, scale 1) on `targets`, its weights set from `factors`; only LoRA trains."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets))
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = mods[name]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def canonical_grads(named_grads: dict) -> dict:
    """LoRA gradients in merged naming: stock q/k/v A grads summed (A is shared), B grads concatenated."""
    out = {}
    pat = re.compile(r"(.*)\.(\w+)\.lora_([AB])\.default\.weight$")
    groups: dict = {}
    for name, g in named_grads.items():
        m = pat.fullmatch(name)
        merged = next((mn for mn, ps in MERGED.items() if m and m.group(2) in ps), None)
        if merged is None:
            out[name] = g
            continue
        key = f"{m.group(1)}.{merged}.lora_{m.group(3)}.default.weight"
        groups.setdefault(key, {})[m.group(2)] = g
    for key, parts in groups.items():
        merged = key.rsplit(".lora_", 1)[0].rsplit(".", 1)[1]
        order = [parts[p] for p in MERGED[merged] if p in parts]
        if len(order) != 3:
            raise ValueError(f"incomplete q/k/v LoRA gradients for {key}: have {sorted(parts)}")
        out[key] = sum(order) if ".lora_A." in key else torch.cat(order)
    return out


def _lora_grads(model):
    return canonical_grads({n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})


@dataclass
class Impl:
    """One provider's runnable form of a case."""
    step: Callable[[dict], Any]            # the timed unit of work on one input set
    collect: Callable[[dict], dict] | None  # runs step, returns named outputs and gradients (None: not verified)
    backend: str | None = None             # kernels backend to select before running
    grads: list = field(default_factory=list)  # tensors whose .grad do_bench resets between runs
    compiled: bool = False


class Workload:
    """What all providers of one case share. `tiny` = reduced sizes (no CUDA)."""

    def __init__(self, case: Case, device, dtype=torch.bfloat16, tiny=False, seed=0, l2_bytes=50 << 20):
        with quiet_diffusers():
            self._setup(case, device, dtype, tiny, seed, l2_bytes)

    def _setup(self, case, device, dtype, tiny, seed, l2_bytes):
        self.case, self.device, self.dtype, self.tiny = case, torch.device(device), dtype, tiny
        self.dims = TINY_DIMS if tiny else REAL_DIMS
        self.heads, self.head_dim = self.dims["heads"], self.dims["head_dim"]
        self.dim = self.heads * self.head_dim
        s_img, s_txt = SHAPES[case.shape]
        if tiny:
            s_img, s_txt = max(1, s_img // TINY_SEQ_DIV), max(1, s_txt // TINY_SEQ_DIV)
        self.s_img, self.s_txt = s_img, s_txt
        self.ref_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        self.train = case.mode == "fwdbwd"
        n_layers = case.blocks if case.level != "op" else 1

        ref = _build_model(n_layers, self.dims, self.device, seed)
        base = copy.deepcopy(ref).to(dtype)
        self.lora = draw_lora(ref, case.rank, seed) if self.train else {}
        # ours: merged weights, made before any LoRA touches the stock modules
        self.fused_model = None
        if case.level == "op":
            attn = base.transformer_blocks[0].attn
            self.op_weights = {s: _merged_stream(attn, s) for s in ("img", "txt")}
        else:
            import qwen_fused

            self.fused_model = qwen_fused.fuse_qkv(copy.deepcopy(base))
        if self.train:
            add_lora(ref, STOCK_LORA_TARGETS, self.lora, case.rank)
            # peft upcasts adapters of a bf16 model to fp32; keep them in the model dtype for both sides
            add_lora(base, STOCK_LORA_TARGETS, self.lora, case.rank).to(dtype)
            if self.fused_model is not None:
                add_lora(self.fused_model, OURS_LORA_TARGETS, merged_lora(self.lora), case.rank).to(dtype)
        self.ref_model = ref.to(self.ref_dtype)
        self.stock_model = base

        self.img_freqs = _rope(s_img, self.head_dim, s_txt, self.device)
        self.txt_freqs = _rope(s_txt, self.head_dim, 0, self.device)
        g = torch.Generator(device=self.device).manual_seed(seed + 2)
        B, C = case.batch, self.dim
        set_bytes = B * (s_img + s_txt) * C * torch.finfo(dtype).bits // 8
        n_sets = 1 if tiny else min(8, max(2, -(-3 * l2_bytes // set_bytes)))

        def rnd(*shape, grad=False):
            return torch.randn(*shape, generator=g, device=self.device, dtype=dtype).requires_grad_(grad)

        # op-level training needs dX (upstream LoRA on img_mod/txt_mod); block inputs come from frozen layers
        xgrad = self.train and case.level == "op"
        self.inputs = [dict(x_img=rnd(B, s_img, C, grad=xgrad), x_txt=rnd(B, s_txt, C, grad=xgrad),
                            temb=rnd(B, C)) for _ in range(n_sets)]
        if case.level == "op":
            shape = (B, s_txt + s_img, self.heads, self.head_dim)
            self.grad_out = [rnd(*shape) for _ in range(3)]
            self.gemm_grad_out = [rnd(B, s_img, 3 * C), rnd(B, s_txt, 3 * C)]
        else:
            self.grad_out = [rnd(B, s_txt, C), rnd(B, s_img, C)]

    # ------------------------------------------------------------------------------------------- helpers
    def input_grads(self):
        return [t for inp in self.inputs for t in inp.values() if t.requires_grad]

    def release_reference(self):
        self.ref_model = None

    def _collect(self, step, params):
        """Verification run: outputs, then (fwdbwd) input and LoRA gradients in canonical naming."""
        def collect(inp):
            for t in params() + [t for t in inp.values() if t.requires_grad]:
                t.grad = None
            outs = step(inp)
            res = {f"out{i}": o.detach() for i, o in enumerate(outs)}
            if self.train:
                res.update({f"grad.{k}": t.grad for k, t in inp.items() if t.grad is not None})
                res.update({f"grad.{k}": g for k, g in params.named().items()})
            return res
        return collect


class _Params:
    """Trainable tensors of a provider: `()` yields them, `.named()` gives canonical-named gradients."""

    def __init__(self, model=None, tensors=None):
        self.model, self.tensors = model, tensors or {}

    def __call__(self):
        if self.model is not None:
            return [p for p in self.model.parameters() if p.requires_grad]
        return list(self.tensors.values())

    def named(self):
        if self.model is not None:
            return _lora_grads(self.model)
        return canonical_grads({n: t.grad for n, t in self.tensors.items() if t.grad is not None})


def _merged_stream(attn, stream):
    """Merged (weight, bias) and norm weights of one stream, from stock modules (no LoRA yet)."""
    names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
    mods = [getattr(attn, n) for n in names]
    nq, nk = (attn.norm_q, attn.norm_k) if stream == "img" else (attn.norm_added_q, attn.norm_added_k)
    return dict(weight=torch.cat([m.weight for m in mods]).detach(), bias=torch.cat([m.bias for m in mods]).detach(),
                norm_q=nq.weight.detach(), norm_k=nk.weight.detach())


def stock_qkv(attn, x_img, x_txt, img_freqs, txt_freqs):
    """QwenDoubleStreamAttnProcessor2_0's QKV stage (projections, QK norm, RoPE, joint layout) on stock modules."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    d = attn.inner_dim // attn.heads
    iq, ik, iv = (p(x_img).unflatten(-1, (-1, d)) for p in (attn.to_q, attn.to_k, attn.to_v))
    tq, tk, tv = (p(x_txt).unflatten(-1, (-1, d)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    iq, ik, tq, tk = attn.norm_q(iq), attn.norm_k(ik), attn.norm_added_q(tq), attn.norm_added_k(tk)
    iq, ik = (apply_rotary_emb_qwen(t, img_freqs, use_real=False) for t in (iq, ik))
    tq, tk = (apply_rotary_emb_qwen(t, txt_freqs, use_real=False) for t in (tq, tk))
    return torch.cat([tq, iq], dim=1), torch.cat([tk, ik], dim=1), torch.cat([tv, iv], dim=1)


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
    params = _Params(model=model)
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
    return step, _Params(tensors=tensors)


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
    return step, _Params(model=model)


def _fused_rope(w):
    # what fuse_qkv's pos_embed hook hands every block: real [S, D//2, 2] tables, converted once per forward
    return tuple(torch.view_as_real(f).contiguous() for f in (w.img_freqs, w.txt_freqs))


def _impl(w, step, params, backend=None, compiled=False):
    return Impl(step=step, collect=w._collect(step, params), backend=backend,
                grads=params() + w.input_grads(), compiled=compiled)


def build_stock(w: Workload, compiled=False):
    if w.case.level == "op":
        step, params = _op_stock(w, w.stock_model, compiled)
    else:
        step, params = _blocks_provider(w, w.stock_model, (w.img_freqs, w.txt_freqs), compiled)
    return _impl(w, step, params, compiled=compiled)


def build_reference(w: Workload):
    """Stock at reference precision (fp32 on CUDA without TF32, float64 on CPU): the yardstick for all."""
    if w.ref_model is None:
        raise RuntimeError("reference model already released")
    if w.case.level == "op":
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
    if w.case.level == "op":
        step, params = _op_ours(w, compiled)
    else:
        step, params = _blocks_provider(w, w.fused_model, _fused_rope(w), compiled)
    return _impl(w, step, params, backend=backend, compiled=compiled)


def build_gemm(w: Workload):
    if w.case.level != "op":
        raise Unavailable("the bare GEMM ceiling is an op-level provider")
    if w.device.type != "cuda":  # a CPU GEMM can be slower than the fused op: no ceiling there
        raise Unavailable("the bare GEMM is a ceiling on CUDA (cuBLAS) only")
    step = _op_gemm(w)
    return Impl(step=step, collect=None, grads=w.input_grads())


@dataclass(frozen=True)
class Provider:
    name: str
    label: str
    build: Callable[[Workload], Impl]
    cpu_default: bool = True


PROVIDERS = {p.name: p for p in [
    Provider("stock", "stock diffusers eager (+peft LoRA)", build_stock),
    Provider("stock-compile", "stock, torch.compile per block", lambda w: build_stock(w, compiled=True), False),
    Provider("ours-triton", "ours, Triton kernels", lambda w: build_ours(w, "triton")),
    Provider("ours-torch", "ours, torch path", lambda w: build_ours(w, "torch")),
    Provider("ours-compile", "ours under torch.compile", lambda w: build_ours(w, "auto", compiled=True), False),
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
