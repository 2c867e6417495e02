"""LoRA on a model: peft adapters on fused and stock Qwen-Image transformers.

Loading a LoRA file (`load_lora`: a peft adapter, or baked into the weights), adding a trainable adapter
(`add_lora`: names mean what they mean to peft on the stock model), and taking an adapter out of a model
(`lora_from_model`, `save_lora`). On a fused model, standard q/k/v LoRAs become one merged LoRA per projection
whose B stays block-diagonal: the same model as stock peft.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import warnings

import torch
from torch import nn

from ..fuse import is_fused, transformer_of
from ..names import STANDARD, STREAMS
from .algebra import LoraFactors, block_columns, config_kwargs, convert, to_merged, to_standard
from .formats import parse_lora, read_lora, write_lora


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


def plan_targets(model, modules):
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
    model = transformer_of(transformer_or_pipeline)
    if not fuse and adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter name {adapter_name!r} already exists on this transformer; pick another name "
                         f"or unload it first (transformer.delete_adapters({adapter_name!r}))")
    state_dict, metadata = read_lora(path_or_state_dict)
    parsed = parse_lora(state_dict, metadata, model)
    plan_targets(model, parsed.modules)  # names and shapes as the file has them, before any conversion
    fused = is_fused(model)
    if fuse:
        modules = to_standard(parsed.modules) if not fused else parsed.modules
        plan = plan_targets(model, modules)
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
    plan_targets(model, modules)  # all names exist as plain modules now; shapes fit
    inject_adapter(model, modules, adapter_name, scale)
    return model


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
    config.update(config_kwargs(modules), use_rslora=False, layers_to_transform=None, layers_pattern=None,
                  exclude_modules=None, lora_bias=any(f.bias is not None for f in modules.values()))
    return state_dict, config


def inject_adapter(model, modules, adapter_name, scale=1.0, base_config=None, **load_kwargs):
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

    model = transformer_of(transformer_or_pipeline)
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
    kwargs = config_kwargs(targets)
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
# saving

def lora_from_model(transformer_or_pipeline, adapter_name="default") -> dict:
    """The peft adapter `adapter_name` of a transformer as {module: LoraFactors} (alpha from its config)."""
    from peft.tuners.lora import LoraLayer

    model = transformer_of(transformer_or_pipeline)
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
        modules = convert(modules, to)
    if dtype is not None:
        modules = {n: LoraFactors(f.a.to(dtype), f.b.to(dtype), f.alpha) for n, f in modules.items()}
    return write_lora(modules, path, layout=layout, overwrite=overwrite)
