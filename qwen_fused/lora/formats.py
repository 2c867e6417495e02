"""LoRA files and state dicts in every layout people have: key parsing and layout detection, reading, writing.

Layouts read (detected from the keys, one per file):
  diffusers   transformer.transformer_blocks.0.attn.to_q.lora_A.weight      (also without `transformer.`: peft)
  diffsynth   transformer_blocks.0.attn.to_q.lora_A.default.weight
  ai-toolkit  diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight  (lora_down/up: comfyui)
  kohya       lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight / .lora_up.weight / .alpha
  lightning   transformer_blocks.0.attn.to_q.lora_down.weight / .lora_up.weight / .alpha
each with standard (to_q, to_k, to_v, add_*_proj) or merged (to_qkv, add_qkv_proj) targets, on the module names of
every family (Qwen-Image; Qwen-Image 2.1's img_mlp.gate_layer / proj / out, modulation.1, txt_in.in_layer, ...,
and ComfyUI's merged img_mlp.gate_up). kohya names are mapped back with the model's module names, or every family's
meta model when there is no model.

Every key must be understood: unknown keys, LoRA variants that cannot be loaded exactly (kohya's `dora_scale`,
LoKr, LoHa, full differences; peft's DoRA `lora_magnitude_vector` loads), mixed layouts, incomplete pairs and bad
shapes raise (this is `qwen_fused.load_lora`'s contract; diffusers' API on a fused model does what stock does with
such keys: qwen_fused/lora/diffusers_api.py). (diffusers' own `_convert_non_diffusers_qwen_lora_to_diffusers` is not used for this: it folds alpha into the factors, so they
no longer round-trip exactly, and it does not check that kohya names exist, nor detect mixed layouts, nor know
the merged `to_qkv` / `add_qkv_proj` targets or `lora_B.bias`.)
"""
from __future__ import annotations

import collections
import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..atomic import atomic_output
from ..names import STANDARD, STREAMS
from .algebra import LoraFactors, apply_config, config_kwargs, convert, row_splits


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
                  r"(?P<param>weight|bias)|(?P<alpha>alpha)|(?P<magnitude>lora_magnitude_vector))$")
_UNSUPPORTED = {"dora_scale": "kohya-style DoRA scale (DoRA loads in peft's lora_magnitude_vector layout)",
                ".diff_b": "full bias difference", ".diff": "full weight difference",
                "lora_A.bias": "bias on LoRA A (not a LoRA)", "lora_down.bias": "bias on LoRA A (not a LoRA)",
                "lokr_": "LoKr factor",
                "hada_": "LoHa factor"}
_FOREIGN = ("double_blocks", "single_blocks", "single_transformer_blocks", "lora_te", "down_blocks",
            "input_blocks", "text_model", "joint_blocks")
_META_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key (LoraConfig kwargs, prefixed)


@dataclass
class ParsedLora:
    modules: dict  # module path inside the transformer (e.g. transformer_blocks.0.attn.to_q) -> LoraFactors
    layout: str  # one of LAYOUTS, or "<prefix>+<style>" for other combinations
    form: str  # "standard" | "merged" | "neither" (no q/k/v targets)


# ----------------------------------------------------------------------------------------------------------
# module-name vocabulary (kohya flattens dots to underscores; we map back with the model's real names)

def _vocabulary(model=None):
    """(top-level Linear names, per-block Linear suffixes) in both standard and merged forms: of `model`, or of
    every family's meta model when there is none (a file converted on its own may be for any of them)."""
    top, block = set(), set()
    for m in [model] if model is not None else _meta_models():
        for name, mod in m.named_modules():
            if not isinstance(mod, nn.Linear) or ".lora_" in name:
                continue
            name = name.removesuffix(".base_layer")  # peft wraps the Linear; the target is the wrapper's name
            found = re.match(r"transformer_blocks\.\d+\.(.+)$", name)
            (block if found else top).add(found.group(1) if found else name)
    for merged, (parts, _) in row_splits().items():  # a block's merged targets and their parts, in either form
        prefix = "attn." if merged in STREAMS else ""
        block.update({prefix + merged} | {prefix + p for p in parts})
    return top, block


_META = []


def _meta_models():
    """Each family's meta model (its module names), built once."""
    if not _META:
        from ..families import FAMILIES

        _META.extend(f.meta_model() for f in FAMILIES if f.model_class() is not None)
    return _META


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
    kind = ("alpha" if m.group("alpha") else "magnitude" if m.group("magnitude")
            else "A" if ab in ("lora_A", "lora_down") else "B")
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
            # `.diff` / `.diff_b` end a key (kohya's full differences), so `.diffusers_cat` is merely unknown
            why = next((v for k, v in _UNSUPPORTED.items() if (key.endswith(k) if k[0] == "." else k in key)), None)
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
        magnitude = kinds["magnitude"][1] if "magnitude" in kinds else None
        if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
            raise ValueError(f"{module}: DoRA magnitude {tuple(magnitude.shape)} does not fit B {tuple(b.shape)}")
        modules[module] = LoraFactors(a, b, None if alpha is None else float(alpha.item()), bias,
                                      magnitude=magnitude)
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
# converting and writing

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
        if f.magnitude is not None:
            if style != "lora_A" or infix:
                raise ValueError(f"{name}: a DoRA magnitude has no key in the {layout} layout; save it in the "
                                 f"diffusers or peft layout")
            out[f"{base}.lora_magnitude_vector"] = f.magnitude.contiguous()
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
    modules = convert(parsed.modules, to)
    with_alpha = had_alpha or any(f.alpha is not None and f.alpha != f.rank for f in modules.values())
    return _emit(modules, layout or _layout_or_default(parsed.layout), with_alpha)


def _layout_or_default(layout):
    return layout if layout in _LAYOUT_KEYS else "diffusers"


def write_lora(modules, path, layout="diffusers", overwrite=False):
    """Write {module: LoraFactors} as safetensors in `layout`, atomically, with metadata (returned)."""
    kohya_like = _LAYOUT_KEYS.get(layout, ("", "lora_A", ""))[1] == "lora_down"
    tensors = _emit(modules, layout, with_alpha=kohya_like or layout != "diffusers")
    cfg = config_kwargs(modules)
    if any(f.bias is not None for f in modules.values()):
        cfg["lora_bias"] = True
    if any(f.magnitude is not None for f in modules.values()):
        cfg["use_dora"] = True
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
