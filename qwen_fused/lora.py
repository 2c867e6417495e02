"""LoRA for Qwen-Image in every layout people have: detection, exact merged<->standard conversion, load, save.

Layouts read (detected from the keys, one per file):
  diffusers   transformer.transformer_blocks.0.attn.to_q.lora_A.weight      (also without `transformer.`: peft)
  diffsynth   transformer_blocks.0.attn.to_q.lora_A.default.weight
  ai-toolkit  diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight  (lora_down/up: comfyui)
  kohya       lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight / .lora_up.weight / .alpha
  lightning   transformer_blocks.0.attn.to_q.lora_down.weight / .lora_up.weight / .alpha
each with standard (to_q, to_k, to_v, add_*_proj) or merged (to_qkv, add_qkv_proj) targets.

A LoRA on one module is `delta W = scale * B @ A` with `scale = alpha / rank` (alpha = rank when absent).
Conversion (design.md section 2), all exact:
  standard -> merged  A = cat(A_q, A_k, A_v), B = blockdiag(B_q, B_k, B_v) (rank r_q + r_k + r_v); when the
                      present A are identical, A is kept and B = cat(B_q, B_k, B_v) (rank r). Different scales
                      are folded into the B blocks (merged scale 1).
  merged -> standard  B split by rows. A block-diagonal B (what standard -> merged makes, or what a masked
                      training run keeps) splits back into the original per-part factors; otherwise every
                      part gets the shared A.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .atomic import atomic_output
from .fuse import _transformer, is_fused
from .names import STANDARD, STREAMS

__all__ = ["load_lora", "convert_lora", "save_lora", "add_lora", "read_lora", "detect_lora_layout"]

LAYOUTS = ("diffusers", "peft", "diffsynth", "ai-toolkit", "comfyui", "kohya", "lightning")
# layout name -> (key prefix, A/B style, infix)
_LAYOUT_KEYS = {
    "diffusers": ("transformer.", "lora_A", ""),
    "peft": ("", "lora_A", ""),
    "diffsynth": ("", "lora_A", ".default"),
    "ai-toolkit": ("diffusion_model.", "lora_A", ""),
    "comfyui": ("diffusion_model.", "lora_down", ""),
    "kohya": ("lora_unet_", "lora_down", ""),
    "lightning": ("", "lora_down", ""),
}
_PREFIXES = ("lora_unet_", "transformer.", "diffusion_model.", "base_model.model.", "")
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<ab>lora_A|lora_B|lora_down|lora_up)(?P<infix>\.default)?\."
                  r"(?P<param>weight|bias)|(?P<alpha>alpha))$")
_UNSUPPORTED = {"dora_scale": "DoRA magnitude (DoRA is not supported)",
                "lora_magnitude_vector": "DoRA magnitude (DoRA is not supported)",
                ".diff_b": "full bias difference", ".diff": "full weight difference",
                "lora_A.bias": "bias on LoRA A (not a LoRA)", "lora_down.bias": "bias on LoRA A (not a LoRA)",
                "lokr_": "LoKr factor",
                "hada_": "LoHa factor"}
_FOREIGN = ("double_blocks", "single_blocks", "single_transformer_blocks", "lora_te", "down_blocks",
            "input_blocks", "text_model", "joint_blocks")
_META_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key (LoraConfig kwargs, prefixed)


@dataclass
class LoraFactors:
    """One module's LoRA: `delta W = scale * b @ a`, a `[r, in]`, b `[out, r]`, scale = alpha / r.

    `bias` `[out]` is peft's `lora_B.bias` (lora_bias=True: `delta b = scale * bias`). `cols`, for a merged
    q/k/v LoRA whose B is kept block-diagonal, holds each part's rank columns, so saving it in the standard layout
    gives back each part's own factors even where B is still all zero.
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float | None = None  # None: alpha = rank (scale 1)
    bias: torch.Tensor | None = None
    cols: list | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class ParsedLora:
    modules: dict  # module path inside the transformer (e.g. transformer_blocks.0.attn.to_q) -> LoraFactors
    layout: str  # one of LAYOUTS, or "<prefix>+<style>" for other combinations
    form: str  # "standard" | "merged" | "neither" (no q/k/v targets)


# ----------------------------------------------------------------------------------------------------------
# module-name vocabulary (kohya flattens dots to underscores; we map back with the model's real names)

def _vocabulary(model=None):
    """(top-level Linear names, per-block Linear suffixes) in both standard and merged forms."""
    if model is None:
        model = _meta_model()
    top, block = set(), set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or ".lora_" in name:
            continue
        name = name.removesuffix(".base_layer")  # peft wraps the Linear; the target is the wrapper's name
        m = re.match(r"transformer_blocks\.\d+\.(.+)$", name)
        (block if m else top).add(m.group(1) if m else name)
    for merged, stds in STREAMS.items():
        block.update({f"attn.{merged}"} | {f"attn.{s}" for s in stds})
    return top, block


_META = []


def _meta_model():
    if not _META:
        from diffusers import QwenImageTransformer2DModel

        with torch.device("meta"):
            _META.append(QwenImageTransformer2DModel(num_layers=1, num_attention_heads=1, attention_head_dim=16,
                                                     joint_attention_dim=16, in_channels=16,
                                                     axes_dims_rope=(4, 6, 6)))
    return _META[0]


def _unflatten(flat, vocab):
    """kohya `transformer_blocks_0_attn_to_q` -> `transformer_blocks.0.attn.to_q`, or None if unknown."""
    top, block = vocab
    for name in top:
        if name.replace(".", "_") == flat:
            return name
    m = re.match(r"transformer_blocks_(\d+)_(.+)$", flat)
    if m:
        for suffix in block:
            if suffix.replace(".", "_") == m.group(2):
                return f"transformer_blocks.{m.group(1)}.{suffix}"
    return None


def _flatten(name):
    return name.replace(".", "_")


# ----------------------------------------------------------------------------------------------------------
# reading and parsing

def read_lora(path_or_state_dict):
    """`(state_dict, file_metadata or None)` from a .safetensors file, a folder holding one, or a dict."""
    if isinstance(path_or_state_dict, dict):
        bad = [k for k, v in path_or_state_dict.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"LoRA state dict values must be tensors; not for {bad[:5]}")
        return dict(path_or_state_dict), None
    path = os.fspath(path_or_state_dict)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(files) != 1:
            raise ValueError(f"{path} is a folder with {len(files)} .safetensors files; pass the file itself")
        path = os.path.join(path, files[0])
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        hint = " (it looks like a pickled torch file; only .safetensors is read)" if _is_pickle(path) else ""
        raise ValueError(f"{path} is not a readable safetensors file{hint}: {e}") from e
    return state_dict, metadata


def _is_pickle(path):
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _split_key(key):
    """key -> (prefix, module, kind, style, infix) with kind 'A' | 'B' | 'alpha', or None if not a LoRA key."""
    m = _KEY.match(key)
    if m is None:
        return None
    prefix = next(p for p in _PREFIXES if m.group("module").startswith(p))
    ab = m.group("ab")
    kind = "alpha" if m.group("alpha") else ("A" if ab in ("lora_A", "lora_down") else "B")
    if m.group("param") == "bias":
        if kind == "A":
            return None
        kind = "bias"
    style = None if ab is None else ("lora_A" if ab in ("lora_A", "lora_B") else "lora_down")
    return prefix, m.group("module")[len(prefix):], kind, style, m.group("infix") or ""


def _layout_name(prefix, style, infix):
    for name, spec in _LAYOUT_KEYS.items():
        if spec == (prefix, style, infix):
            return name
    return f"{prefix or '<bare>'}+{style}{infix}"


def detect_lora_layout(state_dict) -> str:
    """The layout name of a LoRA state dict (see module docstring); raises on mixed or unknown keys."""
    return parse_lora(state_dict).layout


def rank_and_scale(cfg: dict, name: str, rank=None):
    """`(rank, scale)` peft gives module `name` under LoraConfig kwargs `cfg` (rank/alpha patterns, rsLoRA);
    `rank` stands in where `cfg` names none."""
    from peft.utils.other import get_pattern_key

    r_pat, a_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = r_pat.get(get_pattern_key(r_pat.keys(), name), cfg.get("r", rank))
    alpha = a_pat.get(get_pattern_key(a_pat.keys(), name), cfg.get("lora_alpha", r))
    return r, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def apply_config(modules, cfg: dict, only_missing=False):
    """Set each module's alpha to what LoraConfig kwargs `cfg` give it (alpha = scale * rank, plain alpha/r
    semantics), checking the ranks against the tensors."""
    if cfg.get("use_dora"):
        raise ValueError("this LoRA is a DoRA adapter (use_dora in its config); DoRA is not supported")
    for name, f in modules.items():
        if only_missing and f.alpha is not None:
            continue
        r, scale = rank_and_scale(cfg, name, f.rank)
        if r != f.rank:
            raise ValueError(f"{name}: the LoRA config says rank {r} but the tensors have rank {f.rank}")
        f.alpha = scale * f.rank
    return modules


def _alphas_from_metadata(metadata, modules):
    """Fill alphas from diffusers' `lora_adapter_metadata` (LoraConfig kwargs) where the keys had none."""
    if not metadata or _META_KEY not in metadata:
        return
    cfg = {k.removeprefix("transformer."): v for k, v in json.loads(metadata[_META_KEY]).items()}
    if cfg.get("lora_alpha") is None:
        return
    apply_config(modules, cfg, only_missing=True)


def parse_lora(state_dict, metadata=None, model=None) -> ParsedLora:
    """Detect the layout and collect each module's factors. Every key must be understood, or this raises."""
    if not state_dict:
        raise ValueError("the LoRA state dict is empty")
    vocab = _vocabulary(model)
    unknown, unsupported, layouts, prefixes = [], [], collections.defaultdict(list), set()
    parts = collections.defaultdict(dict)
    for key, tensor in state_dict.items():
        split = _split_key(key)
        if split is None:
            why = next((v for k, v in _UNSUPPORTED.items() if k in key), None)
            (unsupported if why else unknown).append(f"{key} ({why})" if why else key)
            continue
        prefix, module, kind, style, infix = split
        prefixes.add(prefix)
        if style is not None:
            layouts[(prefix, style, infix)].append(key)
        if prefix == "lora_unet_":
            dotted = _unflatten(module, vocab)
            if dotted is None:
                unknown.append(f"{key} (no Qwen-Image module is named {module!r})")
                continue
            module = dotted
        parts[module][kind] = (key, tensor)
    if unsupported:
        raise ValueError(f"{len(unsupported)} LoRA keys of a kind that cannot be loaded exactly: "
                         + ", ".join(unsupported))
    if unknown:
        foreign = any(f in k for k in unknown for f in _FOREIGN)
        raise ValueError(
            ("this LoRA was made for another model (its keys name modules a Qwen-Image transformer does not "
             "have): " if foreign else f"{len(unknown)} keys are not LoRA tensors of a Qwen-Image module: ")
            + ", ".join(unknown))
    if len(layouts) > 1 or len(prefixes) > 1:
        desc = "; ".join(f"{len(v)} keys in {_layout_name(*k)} layout (e.g. {v[0]})" for k, v in layouts.items())
        raise ValueError(f"mixed LoRA layouts in one file: {desc or 'key prefixes ' + str(sorted(prefixes))}")
    if not layouts:
        raise ValueError("the state dict holds only alpha values, no LoRA A/B weights")
    (layout_key,) = layouts
    modules, incomplete = {}, []
    for module, kinds in parts.items():
        if "A" not in kinds or "B" not in kinds:
            have = ", ".join(k for k, _ in kinds.values())
            incomplete.append(f"{module} (has only {have})")
            continue
        a, b = kinds["A"][1], kinds["B"][1]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{module}: LoRA A {tuple(a.shape)} and B {tuple(b.shape)} are not a [r, in] / "
                             f"[out, r] pair")
        alpha = kinds["alpha"][1] if "alpha" in kinds else None
        if alpha is not None and alpha.numel() != 1:
            raise ValueError(f"{module}: alpha must be a scalar, got shape {tuple(alpha.shape)}")
        bias = kinds["bias"][1] if "bias" in kinds else None
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise ValueError(f"{module}: LoRA bias {tuple(bias.shape)} does not fit B {tuple(b.shape)}")
        modules[module] = LoraFactors(a, b, None if alpha is None else float(alpha.item()), bias)
    if incomplete:
        raise ValueError("LoRA modules with a missing A or B weight: " + ", ".join(incomplete))
    _alphas_from_metadata(metadata, modules)
    return ParsedLora(modules, _layout_name(*layout_key), _form(modules))


def _form(modules):
    leaves = {name.rsplit(".", 1)[-1] for name in modules}
    merged, standard = leaves & set(STREAMS), leaves & set(STANDARD)
    if merged and standard:
        raise ValueError(f"mixed LoRA layouts in one file: merged targets {sorted(merged)} and standard "
                         f"targets {sorted(standard)}")
    return "merged" if merged else "standard" if standard else "neither"


# ----------------------------------------------------------------------------------------------------------
# the algebra

def to_merged(modules: dict) -> dict:
    """Standard q/k/v LoRAs -> one LoRA per merged projection (exact; see module docstring)."""
    out, groups = {}, collections.defaultdict(dict)
    for name, f in modules.items():
        attn, _, leaf = name.rpartition(".")
        if leaf in STANDARD:
            merged, i = STANDARD[leaf]
            groups[f"{attn}.{merged}"][i] = f
        else:
            out[name] = f
    for name, parts in groups.items():
        out[name] = _merge_parts(name, parts)
    return out


def _merge_parts(name, parts):
    order = sorted(parts)
    first = parts[order[0]]
    n, c = first.b.shape[0], first.a.shape[1]
    for i in order:
        if parts[i].b.shape[0] != n or parts[i].a.shape[1] != c:
            raise ValueError(f"{name}: q/k/v LoRAs disagree in shape (out {parts[i].b.shape[0]} vs {n}, in "
                             f"{parts[i].a.shape[1]} vs {c}); not one attention's projections")
    dtype = first.b.dtype
    for i in order:
        dtype = torch.promote_types(dtype, torch.promote_types(parts[i].a.dtype, parts[i].b.dtype))
    scales = [parts[i].scale for i in order]
    same_scale = all(s == scales[0] for s in scales)
    no_alpha = all(parts[i].alpha is None for i in order)
    same_a = all(parts[i].a.shape == first.a.shape and torch.equal(parts[i].a, first.a) for i in order)
    a = first.a.to(dtype) if same_a else torch.cat([parts[i].a.to(dtype) for i in order])
    b = torch.zeros(3 * n, a.shape[0], dtype=dtype, device=first.b.device)
    has_bias = any(parts[i].bias is not None for i in order)
    bias = torch.zeros(3 * n, dtype=dtype, device=first.b.device) if has_bias else None
    col, blocks = 0, [torch.arange(0)] * 3
    for i in order:
        r = parts[i].rank
        cols = slice(0, r) if same_a else slice(col, col + r)
        scale = 1.0 if same_scale else parts[i].scale  # folded into B (and the bias) when the scales differ
        b[i * n:(i + 1) * n, cols] = parts[i].b.to(dtype) * scale
        if parts[i].bias is not None:
            bias[i * n:(i + 1) * n] = parts[i].bias.to(dtype) * scale
        blocks[i] = torch.arange(col, col + r)
        col += r
    rank = a.shape[0]
    alpha = None if no_alpha else (scales[0] * rank if same_scale else float(rank))
    return LoraFactors(a, b, alpha, bias, None if same_a else blocks)


def to_standard(modules: dict) -> dict:
    """Merged LoRAs -> one LoRA per q/k/v projection (exact; see module docstring)."""
    out = {}
    for name, f in modules.items():
        attn, _, leaf = name.rpartition(".")
        if leaf not in STREAMS:
            out[name] = f
            continue
        if f.b.shape[0] % 3:
            raise ValueError(f"{name}: merged LoRA B has {f.b.shape[0]} rows, not 3 equal q/k/v blocks")
        n = f.b.shape[0] // 3
        blocks = [f.b[i * n:(i + 1) * n] for i in range(3)]
        biases = [None if f.bias is None else f.bias[i * n:(i + 1) * n] for i in range(3)]
        cols = f.cols if f.cols is not None and _only_in(f.b, f.cols) else block_columns(f.b)
        prefix = f"{attn}." if attn else ""
        for i, std in enumerate(STREAMS[leaf]):
            if cols is None:
                out[prefix + std] = LoraFactors(f.a, blocks[i], f.alpha, biases[i])
            elif len(cols[i]):
                r, c = len(cols[i]), cols[i].to(f.a.device)
                out[prefix + std] = LoraFactors(f.a[c], blocks[i][:, c], None if f.alpha is None else f.scale * r,
                                                biases[i])
    return out


def _only_in(b, cols):
    """True when each q/k/v row block of a merged B is zero outside its part's rank columns `cols`."""
    n = b.shape[0] // 3
    outside = torch.ones(b.shape, dtype=torch.bool, device=b.device)
    for i, c in enumerate(cols):
        outside[i * n:(i + 1) * n, c.to(b.device)] = False
    return not bool(b[outside].any())


def block_columns(b):
    """The rank columns of each q/k/v part when a merged B `[3n, R]` is block-diagonal, else None.

    Block-diagonal: every column is nonzero in at most one row block. Columns nonzero in no block go to the
    part(s) whose B is entirely zero (a part that never got a gradient, e.g. text queries of the last block),
    so a stock q/k/v LoRA comes back with its own rank. An all-zero B (fresh init) is not block-diagonal.
    """
    n = b.shape[0] // 3
    used = torch.stack([(b[i * n:(i + 1) * n] != 0).any(0) for i in range(3)])  # [3, R]
    if not used.any() or bool((used.sum(0) > 1).any()):
        return None
    free = ~used.any(0)
    return [(used[i] if used[i].any() else free).nonzero().flatten() for i in range(3)]


def _convert(modules, to):
    if to == "merged":
        return to_merged(modules)
    if to == "standard":
        return to_standard(modules)
    raise ValueError(f"to must be 'merged' or 'standard', got {to!r}")


def _emit(modules, layout, with_alpha):
    if layout not in _LAYOUT_KEYS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    prefix, style, infix = _LAYOUT_KEYS[layout]
    a_name, b_name = ("lora_A", "lora_B") if style == "lora_A" else ("lora_down", "lora_up")
    out = {}
    for name, f in modules.items():
        base = prefix + (_flatten(name) if prefix == "lora_unet_" else name)
        out[f"{base}.{a_name}{infix}.weight"] = f.a.contiguous()
        out[f"{base}.{b_name}{infix}.weight"] = f.b.contiguous()
        if f.bias is not None:
            if style != "lora_A":
                raise ValueError(f"{name}: a LoRA bias (lora_bias=True) has no key in the {layout} layout; "
                                 f"save it in the diffusers or peft layout")
            out[f"{base}.{b_name}{infix}.bias"] = f.bias.contiguous()
        if with_alpha:
            alpha = float(f.rank) if f.alpha is None else f.alpha
            out[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def convert_lora(state_dict, to="merged", layout=None):
    """A LoRA state dict (any layout) with q/k/v targets converted to `to` ("merged" | "standard").

    Exact algebra (design.md section 2). The result keeps the input's layout unless `layout` names another
    one; it carries `.alpha` keys where the input did or where the conversion made alpha differ from rank.
    """
    had_alpha = any(k.endswith(".alpha") for k in state_dict)
    parsed = parse_lora(state_dict)
    modules = _convert(parsed.modules, to)
    with_alpha = had_alpha or any(f.alpha is not None and f.alpha != f.rank for f in modules.values())
    return _emit(modules, layout or _layout_or_default(parsed.layout), with_alpha)


def _layout_or_default(layout):
    return layout if layout in _LAYOUT_KEYS else "diffusers"


# ----------------------------------------------------------------------------------------------------------
# loading onto a model

def _linear(model, name):
    """The nn.Linear at `name` (the base layer when peft wraps it), or None."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    base = getattr(mod, "base_layer", mod)
    return base if isinstance(base, nn.Linear) else None


def _targets(model, modules):
    """Validate every module and shape before anything changes: name -> (Linear, row slice)."""
    missing, bad, plan = [], [], {}
    for name, f in modules.items():
        attn, _, leaf = name.rpartition(".")
        rows = slice(None)
        lin = _linear(model, name)
        if lin is None and leaf in STANDARD:  # a standard target on a fused model: its row slice of to_qkv
            merged, i = STANDARD[leaf]
            lin = _linear(model, f"{attn}.{merged}")
            if lin is not None:
                n = lin.out_features // 3
                rows = slice(i * n, (i + 1) * n)
        parts = [_linear(model, f"{attn}.{s}") for s in STREAMS.get(leaf, ())]
        if lin is None and parts and all(parts):  # a merged target on a stock model: q/k/v stacked
            lin = parts[0]
            out = sum(p.out_features for p in parts)
        elif lin is None:
            missing.append(name)
            continue
        else:
            out = len(range(lin.out_features)[rows])
        if f.a.shape[1] != lin.in_features or f.b.shape[0] != out:
            where = "" if rows == slice(None) else f" (rows {rows.start}:{rows.stop} of the merged projection)"
            bad.append(f"{name}: LoRA A {tuple(f.a.shape)} / B {tuple(f.b.shape)} need [out {f.b.shape[0]}, in "
                       f"{f.a.shape[1]}] but the module is [out {out}, in {lin.in_features}]{where}")
            continue
        if f.bias is not None and lin.bias is None:
            bad.append(f"{name}: the LoRA has a bias (lora_bias) but the module has none to fuse it into")
            continue
        plan[name] = (lin, rows)
    if missing and not plan:
        raise ValueError(f"this LoRA was made for another model: none of its modules exist in this Qwen-Image "
                         f"transformer ({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''})")
    if missing:
        raise ValueError(f"{len(missing)} LoRA modules match no module of this transformer: {', '.join(missing)}")
    if bad:
        raise ValueError(f"{len(bad)} LoRA shapes do not fit this transformer (a LoRA for another model size?): "
                         + "; ".join(bad))
    return plan


def load_lora(transformer_or_pipeline, path_or_state_dict, adapter_name="default", scale=1.0, fuse=False):
    """Load a LoRA in any supported layout onto a fused or unfused Qwen-Image transformer.

    fuse=False attaches a peft adapter `adapter_name` (trainable, can be disabled, re-scaled, unloaded and
    combined with others by name; diffusers' `set_adapters` etc. work). Standard q/k/v LoRAs on a fused model
    become merged ones (block-diagonal B, whose off-diagonal blocks are kept at zero during training, so the
    model stays the stock one). fuse=True adds `scale * alpha/r * B @ A` into the base weights (each q/k/v part
    into its row slice of a merged projection) and leaves no adapter. Everything is validated before any
    weight changes. Returns the transformer.
    """
    model = _transformer(transformer_or_pipeline)
    if not fuse and adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter name {adapter_name!r} already exists on this transformer; pick another name "
                         f"or unload it first (transformer.delete_adapters({adapter_name!r}))")
    state_dict, metadata = read_lora(path_or_state_dict)
    parsed = parse_lora(state_dict, metadata, model)
    _targets(model, parsed.modules)  # names and shapes as the file has them, before any conversion
    fused = is_fused(model)
    if fuse:
        modules = to_standard(parsed.modules) if not fused else parsed.modules
        plan = _targets(model, modules)
        with torch.no_grad():
            for name, f in modules.items():
                lin, rows = plan[name]
                w = lin.weight
                dtype = torch.promote_types(w.dtype, torch.float32)
                delta = (f.b.to(w.device, dtype) @ f.a.to(w.device, dtype)) * (f.scale * scale)
                w[rows] += delta.to(w.dtype)
                if f.bias is not None:
                    lin.bias[rows] += (f.bias.to(w.device, dtype) * (f.scale * scale)).to(lin.bias.dtype)
        return model
    modules = to_merged(parsed.modules) if fused else to_standard(parsed.modules)
    _targets(model, modules)  # all names exist as plain modules now; shapes fit
    _inject(model, modules, adapter_name, scale)
    return model


def _config_kwargs(modules):
    """LoraConfig kwargs for exact per-module ranks and alphas; `modules` maps name -> LoraFactors or (r, alpha)."""
    pairs = {n: (f.rank, f.alpha) if isinstance(f, LoraFactors) else f for n, f in modules.items()}
    ranks = {name: r for name, (r, _) in pairs.items()}
    alphas = {name: float(r) if a is None else a for name, (r, a) in pairs.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {f"^{k}": v for k, v in ranks.items() if v != r},
            "alpha_pattern": {f"^{k}": v for k, v in alphas.items() if v != alpha}}


def peft_adapter(modules, base_config=None):
    """{module: LoraFactors} -> (peft state dict, LoraConfig kwargs) with each module's exact rank and scale.

    `base_config` (LoraConfig kwargs) keeps its other settings (dropout, init, ...); targets, ranks and alphas
    are replaced by exact per-module names and patterns, so nothing else may select modules.
    """
    state_dict = {}
    for name, f in modules.items():
        state_dict[f"{name}.lora_A.weight"] = f.a
        state_dict[f"{name}.lora_B.weight"] = f.b
        if f.bias is not None:
            state_dict[f"{name}.lora_B.bias"] = f.bias
    config = {k: v for k, v in (base_config or {}).items() if k != "peft_type"}
    config.update(_config_kwargs(modules), use_rslora=False, layers_to_transform=None, layers_pattern=None,
                  exclude_modules=None, lora_bias=any(f.bias is not None for f in modules.values()))
    return state_dict, config


def _inject(model, modules, adapter_name, scale=1.0, base_config=None, **load_kwargs):
    """Attach `modules` as peft adapter `adapter_name` through diffusers' own `load_lora_adapter`."""
    from peft.tuners.lora import LoraLayer

    state_dict, config = peft_adapter(modules, base_config)
    type(model).load_lora_adapter(model, state_dict, prefix=None, adapter_name=adapter_name, metadata=config,
                                  **load_kwargs)
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A:
            if scale != 1.0:
                mod.set_scale(adapter_name, scale)
            if name in modules and name.rsplit(".", 1)[-1] in STREAMS:
                _keep_block_diagonal(mod, adapter_name, modules[name].cols)


def _keep_block_diagonal(layer, adapter_name, cols=None):
    """A block-diagonal merged B (standard q/k/v LoRAs) keeps zero off-diagonal blocks while training."""
    if cols is None:
        cols = block_columns(layer.lora_B[adapter_name].weight.detach())
    if cols is not None:
        _register_mask(layer, adapter_name, {i: c for i, c in enumerate(cols) if len(c)})


def _register_mask(layer, adapter_name, cols):
    """Zero B outside the blocks `cols` (q/k/v part index -> its rank columns), in the weight and its gradient."""
    b = layer.lora_B[adapter_name].weight
    n = b.shape[0] // 3
    mask = torch.zeros(b.shape, dtype=torch.float32)
    for i, c in cols.items():
        mask[i * n:(i + 1) * n, c.cpu()] = 1
    with torch.no_grad():
        b.mul_(mask.to(b.device, b.dtype))
    b.register_hook(lambda g: g * mask.to(g.device, g.dtype))
    layer._qwen_fused_block_mask = getattr(layer, "_qwen_fused_block_mask", {}) | {adapter_name: mask}


# ----------------------------------------------------------------------------------------------------------
# peft adapters on a fused model

def _peft_add_adapter(model, config, adapter_name):
    """diffusers' own `add_adapter` (the class method: a fused model's instance routes its `add_adapter` here)."""
    type(model).add_adapter(model, config, adapter_name)


def add_lora(transformer_or_pipeline, config, adapter_name="default"):
    """`transformer.add_adapter(config, adapter_name)`, mapping standard q/k/v targets on a fused model.

    On a fused model, q/k/v projections the config would target on the stock model become the merged
    projection with rank r_q + r_k + r_v, scale alpha/r, and a block-diagonal B whose off-diagonal blocks stay
    zero: the same model as stock peft, trained the same way (one warning line says so). Other targets are
    unchanged. Unfused models get `add_adapter(config)` as is. Returns the transformer.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    model = _transformer(transformer_or_pipeline)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter name {adapter_name!r} already exists on this transformer")
    if not is_fused(model) or isinstance(config.target_modules, str) and config.target_modules == "all-linear":
        _peft_add_adapter(model, config, adapter_name)
        return model
    # the names the stock model would have: every Linear, merged projections shown as their q/k/v parts
    stock_names = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in STREAMS:
            stock_names += [f"{name[:-len(leaf)]}{s}" for s in STREAMS[leaf]]
        elif (isinstance(getattr(mod, "base_layer", mod), nn.Linear) and ".base_layer" not in name
              and ".lora_" not in name):
            stock_names.append(name)
    groups, targets, mapped = collections.defaultdict(dict), {}, set()
    for name in stock_names:
        if not check_target_module_exists(config, name):
            continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        attn, _, leaf = name.rpartition(".")
        if leaf in STANDARD:
            merged, i = STANDARD[leaf]
            groups[f"{attn}.{merged}"][i] = (r, scale)
            mapped.add(leaf)
        else:
            targets[name] = (r, alpha)
    if not mapped:
        _peft_add_adapter(model, config, adapter_name)
        return model
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} changes base weights and cannot be "
                         f"mapped onto merged q/k/v projections; use the default initialisation")
    blocks = {}
    for name, parts in groups.items():
        scales = {s for _, s in parts.values()}
        if len(scales) > 1:
            raise ValueError(f"{name}: q/k/v parts have different LoRA scales {sorted(scales)}; one merged "
                             f"adapter has one scale")
        rank = sum(r for r, _ in parts.values())
        s = scales.pop()
        targets[name] = (rank, s * math.sqrt(rank) if config.use_rslora else s * rank)
        blocks[name] = [(i, parts[i][0]) for i in sorted(parts)]
    warnings.warn(f"qwen_fused: LoRA targets {', '.join(sorted(mapped))} mapped to the merged "
                  f"{'/'.join(sorted({STANDARD[m][0] for m in mapped}))} of this fused model (block-diagonal, "
                  f"same model as stock)", stacklevel=2)
    kwargs = _config_kwargs(targets)
    config = dataclasses.replace(config, **kwargs, layers_to_transform=None, layers_pattern=None,
                                 exclude_modules=None)
    _peft_add_adapter(model, config, adapter_name)
    for name, parts in blocks.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LoraLayer)
        rank, cols, start = sum(r for _, r in parts), {}, 0
        for i, r in parts:
            cols[i], start = torch.arange(start, start + r), start + r
        _register_mask(layer, adapter_name, cols)
        if config.init_lora_weights == "gaussian":  # peft draws A ~ N(0, 1/rank): each part keeps its own rank's
            with torch.no_grad():
                a = layer.lora_A[adapter_name].weight
                for i, r in parts:
                    a[cols[i].to(a.device)] *= rank / r
    return model


# ----------------------------------------------------------------------------------------------------------
# diffusers' own LoRA API on a fused model: `fuse_qkv` binds these on the transformer instance (and wraps the
# Qwen pipelines' `save_lora_weights`), so LoRA files stay in the standard layout that stock tools read

def _has_leaf(names, leaves):
    return any(n.split(".lora_")[0].rsplit(".", 1)[-1] in leaves for n in names)


def fused_load_lora_adapter(model, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False,
                            **kwargs):
    """diffusers' `load_lora_adapter` on a fused model (also what `pipe.load_lora_weights` calls).

    A LoRA with standard q/k/v targets is built into the peft config diffusers would build on the stock model,
    then converted exactly to the merged projections (block-diagonal B, kept so while training) and loaded
    through diffusers' own loader. Anything it cannot express raises (DoRA, LoKr, unknown keys); nothing is
    dropped. Without q/k/v targets this is diffusers' loader unchanged.
    """
    from diffusers.loaders.lora_base import _fetch_state_dict
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config, get_adapter_name

    fetch = {k: kwargs.pop(k, None) for k in ("weight_name", "use_safetensors", "local_files_only", "cache_dir",
                                              "proxies", "token", "revision", "subfolder")}
    state_dict, metadata = _fetch_state_dict(
        pretrained_model_name_or_path_or_dict, force_download=kwargs.pop("force_download", False),
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"}, allow_pickle=False,
        metadata=kwargs.pop("metadata", None), **fetch)
    ours = state_dict
    if prefix is not None:
        ours = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if not _has_leaf(ours, STANDARD):
        return type(model).load_lora_adapter(model, state_dict, prefix=prefix, hotswap=hotswap, metadata=metadata,
                                             **kwargs)
    if metadata is not None and prefix is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    network_alphas = kwargs.pop("network_alphas", None)
    if network_alphas and prefix is not None:
        network_alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items()
                          if k.startswith(f"{prefix}.")}
    if "lora_A" not in next(iter(ours)):
        ours = convert_unet_state_dict_to_peft(ours)
    ranks = {f"^{k}": v.shape[1] for k, v in ours.items() if "lora_B" in k and v.ndim > 1}
    # the config stock diffusers builds for this LoRA: every module's rank and scale come from it
    config = _create_lora_config(ours, network_alphas, metadata, ranks).to_dict()
    modules = apply_config(parse_lora(ours, model=model).modules, config)
    merged = to_merged(modules)
    _targets(model, merged)
    adapter_name = kwargs.pop("adapter_name", None) or get_adapter_name(model)
    if adapter_name in getattr(model, "peft_config", {}) and not hotswap:
        raise ValueError(f"Adapter name {adapter_name} already in use in the model - please select a new adapter "
                         f"name.")
    _inject(model, merged, adapter_name, base_config=config, hotswap=hotswap, **kwargs)


def fused_save_lora_adapter(model, save_directory, adapter_name="default", upcast_before_saving=False,
                            safe_serialization=True, weight_name=None):
    """diffusers' `save_lora_adapter` on a fused model: merged q/k/v LoRAs are written in the standard layout
    (exactly: each part's own factors where B is block-diagonal, the shared A otherwise), with the LoraConfig
    metadata that gives every module its scale."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.utils.peft_utils import get_adapter_name

    if adapter_name is None:
        adapter_name = get_adapter_name(model)
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter name {adapter_name} not found in the model.")
    modules = lora_from_model(model, adapter_name)
    if not _has_leaf(modules, STREAMS):
        return type(model).save_lora_adapter(model, save_directory, adapter_name, upcast_before_saving,
                                             safe_serialization, weight_name)
    if upcast_before_saving:
        modules = {n: dataclasses.replace(f, a=f.a.float(), b=f.b.float(),
                                          bias=None if f.bias is None else f.bias.float())
                   for n, f in modules.items()}
    state_dict, config = peft_adapter(to_standard(modules), model.peft_config[adapter_name].to_dict())
    # own contiguous tensors: the q/k/v parts are views of one merged B, which safetensors refuses
    state_dict = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}
    LoraBaseMixin.write_lora_layers(state_dict, save_directory, is_main_process=True, weight_name=weight_name,
                                    save_function=None, safe_serialization=safe_serialization,
                                    lora_adapter_metadata=config if safe_serialization else None)


def standard_lora_layers(state_dict, config=None):
    """A peft LoRA state dict and its LoraConfig kwargs (None: diffusers' defaults, scale 1) with merged q/k/v
    targets -> the same LoRA with standard targets, exactly: `(state_dict, config)`."""
    modules = apply_config(parse_lora(state_dict).modules, dict(config or {}))
    state_dict, config = peft_adapter(to_standard(modules), config)
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}, config


def wrap_pipeline_lora_saving():
    """Make the Qwen pipelines' `save_lora_weights` (a classmethod: called with the state dict of
    `get_peft_model_state_dict(fused_transformer)`, which has merged keys) write the standard layout."""
    import inspect

    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin

    func = QwenImageLoraLoaderMixin.__dict__["save_lora_weights"].__func__
    if getattr(func, "_qwen_fused", False):
        return
    signature = inspect.signature(func)

    @functools.wraps(func)
    def save_lora_weights(cls, *args, **kwargs):
        bound = signature.bind(cls, *args, **kwargs)
        layers = bound.arguments.get("transformer_lora_layers")
        if isinstance(layers, dict) and _has_leaf(layers, STREAMS):
            layers, config = standard_lora_layers(layers, bound.arguments.get("transformer_lora_adapter_metadata"))
            bound.arguments.update(transformer_lora_layers=layers, transformer_lora_adapter_metadata=config)
        return func(*bound.args, **bound.kwargs)

    save_lora_weights._qwen_fused = True
    QwenImageLoraLoaderMixin.save_lora_weights = classmethod(save_lora_weights)


# ----------------------------------------------------------------------------------------------------------
# saving

def lora_from_model(transformer_or_pipeline, adapter_name="default") -> dict:
    """The peft adapter `adapter_name` of a transformer as {module: LoraFactors} (alpha from its config)."""
    from peft.tuners.lora import LoraLayer

    model = _transformer(transformer_or_pipeline)
    modules = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or adapter_name not in mod.lora_A:
            continue
        if mod.use_dora.get(adapter_name) or adapter_name in getattr(mod, "lora_variant", {}):
            raise ValueError(f"{name}: adapter {adapter_name!r} is a LoRA variant (DoRA, ...); not saved as LoRA")
        r = mod.r[adapter_name]
        scale = mod.lora_alpha[adapter_name] / (math.sqrt(r) if mod.use_rslora.get(adapter_name) else r)
        bias = getattr(mod.lora_B[adapter_name], "bias", None)
        mask = getattr(mod, "_qwen_fused_block_mask", {}).get(adapter_name)
        cols = None if mask is None else [blk.any(0).nonzero().flatten() for blk in mask.chunk(3)]
        modules[name] = LoraFactors(mod.lora_A[adapter_name].weight.detach(), mod.lora_B[adapter_name].weight.detach(),
                                    scale * r, None if bias is None else bias.detach(), cols)
    if not modules:
        raise ValueError(f"the transformer has no LoRA adapter named {adapter_name!r}")
    return modules


def save_lora(source, path, *, layout="diffusers", to="standard", adapter_name="default", overwrite=False,
              dtype=None):
    """Write a LoRA as safetensors, atomically. Returns the metadata written.

    source: a transformer/pipeline with a peft adapter `adapter_name`, or a LoRA state dict in any layout.
    layout: "diffusers" (default; `transformer.` prefix, LoraConfig in diffusers' `lora_adapter_metadata`)
    or "kohya" (`lora_unet_...lora_down/up/alpha`, for ComfyUI), or any other name in LAYOUTS.
    to: "standard" (default: loads in stock tools), "merged", or None to keep the q/k/v form as it is.
    Metadata also holds rank, alpha, layout, form and targets.
    """
    if isinstance(source, dict):
        modules = parse_lora(*read_lora(source)).modules
    else:
        modules = lora_from_model(source, adapter_name)
    if to is not None:
        modules = _convert(modules, to)
    if dtype is not None:
        modules = {n: LoraFactors(f.a.to(dtype), f.b.to(dtype), f.alpha) for n, f in modules.items()}
    return write_lora(modules, path, layout=layout, overwrite=overwrite)


def write_lora(modules, path, layout="diffusers", overwrite=False):
    """Write {module: LoraFactors} as safetensors in `layout`, atomically, with metadata (returned)."""
    kohya_like = _LAYOUT_KEYS.get(layout, ("", "lora_A", ""))[1] == "lora_down"
    tensors = _emit(modules, layout, with_alpha=kohya_like or layout != "diffusers")
    cfg = _config_kwargs(modules)
    if any(f.bias is not None for f in modules.values()):
        cfg["lora_bias"] = True
    meta = {"format": "pt", "layout": layout, "form": _form(modules), "rank": str(cfg["r"]),
            "alpha": repr(cfg["lora_alpha"]), "num_modules": str(len(modules)),
            "targets": json.dumps(sorted({re.sub(r"^transformer_blocks\.\d+\.", "", n) for n in modules}))}
    if cfg["rank_pattern"]:
        meta["rank_pattern"] = json.dumps(cfg["rank_pattern"], sort_keys=True)
    if cfg["alpha_pattern"]:
        meta["alpha_pattern"] = json.dumps(cfg["alpha_pattern"], sort_keys=True)
    if layout == "diffusers":
        meta[_META_KEY] = json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, sort_keys=True)
    if kohya_like:
        meta["ss_network_dim"], meta["ss_network_alpha"] = str(cfg["r"]), repr(cfg["lora_alpha"])
    write_safetensors(tensors, path, meta, overwrite=overwrite)
    return meta


def write_safetensors(tensors, path, metadata=None, overwrite=False):
    """safetensors `save_file` to a temp file beside `path`, then os.replace; refuses to overwrite by default."""
    from safetensors.torch import save_file

    with atomic_output(path, overwrite) as tmp:
        # own contiguous copies: split q/k/v parts share A and B storage, which save_file refuses
        tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        save_file(tensors, tmp, metadata=metadata)
