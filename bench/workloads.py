"""Benchmark workloads: what every provider of one case shares.

A `Workload` holds the stock weights at reference precision, the LoRA factors, the rotating input sets and the
output gradients, so that all providers compute the same function on the same data and can be checked against
one reference before they are timed.
"""
from __future__ import annotations

import copy
import re

import torch

from qwen_fused.names import STREAMS
from qwen_fused.tiny import random_transformer, rope_axes

from .cases import REAL_DIMS, SHAPES, TINY_DIMS, TINY_SEQ_DIV, Case

STOCK_LORA_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                      "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1"]
OURS_LORA_TARGETS = list(STREAMS) + STOCK_LORA_TARGETS[6:]


def _rope(seq, head_dim, offset, device):
    """Complex RoPE freqs [seq, head_dim // 2] (unit modulus, position x inverse frequency)."""
    inv = 10000.0 ** (-torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))
    ang = torch.outer(torch.arange(offset, offset + seq, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64).to(device)


def draw_lora(model, rank, seed, targets=STOCK_LORA_TARGETS):
    """Random LoRA factors (fp32) for every stock target of `model`, A shared within each q/k/v group so the
    merged form (A, cat B) computes exactly the same function. B is nonzero so the LoRA path is live."""
    g = torch.Generator().manual_seed(seed + 1)
    factors = {}
    for name, mod in model.named_modules():
        target = next((t for t in targets if name == t or name.endswith("." + t)), None)
        if target is None or not isinstance(mod, torch.nn.Linear):
            continue
        a = torch.randn(rank, mod.in_features, generator=g) / mod.in_features ** 0.5
        b = torch.randn(mod.out_features, rank, generator=g) * (0.5 / rank ** 0.5)
        factors[name] = [a, b]
    for prefix in {n.rsplit(".", 1)[0] for n in factors if n.endswith((".to_q", ".add_q_proj"))}:
        for parts in STREAMS.values():
            names = [f"{prefix}.{p}" for p in parts]
            if all(n in factors for n in names):
                for n in names[1:]:
                    factors[n][0] = factors[names[0]][0]
    return factors


def merged_lora(factors):
    """Stock-target factors -> merged-target factors (A shared, B = cat of the q, k, v B's)."""
    out = {n: ab for n, ab in factors.items() if not any(n.endswith("." + p) for ps in STREAMS.values() for p in ps)}
    for prefix in {n.rsplit(".", 1)[0] for n in factors if n.endswith((".to_q", ".add_q_proj"))}:
        for merged, parts in STREAMS.items():
            names = [f"{prefix}.{p}" for p in parts]
            if all(n in factors for n in names):
                out[f"{prefix}.{merged}"] = [factors[names[0]][0], torch.cat([factors[n][1] for n in names])]
    return out


def add_lora(model, targets, factors, rank, dtype):
    """peft LoRA (alpha = rank, scale 1) on `targets`, its weights set from `factors` in `dtype` (peft would keep
    them in fp32 on a bf16 model; both sides get the model's dtype); only LoRA trains."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets))
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = mods[name]
            for lin, w in ((layer.lora_A["default"], a), (layer.lora_B["default"], b)):
                lin.to(dtype).weight.copy_(w)
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
        merged = next((mn for mn, ps in STREAMS.items() if m and m.group(2) in ps), None)
        if merged is None:
            out[name] = g
            continue
        key = f"{m.group(1)}.{merged}.lora_{m.group(3)}.default.weight"
        groups.setdefault(key, {})[m.group(2)] = g
    for key, parts in groups.items():
        merged = key.rsplit(".lora_", 1)[0].rsplit(".", 1)[1]
        order = [parts[p] for p in STREAMS[merged] if p in parts]
        if len(order) != 3:
            raise ValueError(f"incomplete q/k/v LoRA gradients for {key}: have {sorted(parts)}")
        out[key] = sum(order) if ".lora_A." in key else torch.cat(order)
    return out


def _lora_grads(model):
    return canonical_grads({n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})


class Workload:
    """What all providers of one case share. `tiny` = reduced sizes (no CUDA)."""

    def __init__(self, case: Case, device, dtype=torch.bfloat16, tiny=False, seed=0, l2_bytes=50 << 20):
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

        cfg = dict(num_layers=n_layers, attention_head_dim=self.head_dim, num_attention_heads=self.heads,
                   axes_dims_rope=rope_axes(self.head_dim))
        # the same draws in both: base holds the reference's weights rounded to dtype
        ref = random_transformer(seed, device=self.device, dtype=self.ref_dtype, **cfg).requires_grad_(False)
        base = random_transformer(seed, device=self.device, dtype=dtype, **cfg).requires_grad_(False)
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
            add_lora(ref, STOCK_LORA_TARGETS, self.lora, case.rank, self.ref_dtype)
            add_lora(base, STOCK_LORA_TARGETS, self.lora, case.rank, dtype)
            if self.fused_model is not None:
                add_lora(self.fused_model, OURS_LORA_TARGETS, merged_lora(self.lora), case.rank, dtype)
        self.ref_model = ref
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


class Params:
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
