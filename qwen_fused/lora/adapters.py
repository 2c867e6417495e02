"""LoRA on a model: peft adapters on fused and stock Qwen-Image transformers.

Loading a LoRA file (`load_lora`: a peft adapter, or baked into the weights), adding a trainable adapter
(`add_lora`: names mean what they mean to peft on the stock model), and taking an adapter out of a model
(`lora_from_model`, `save_lora`). On a model that holds projections merged (fuse_qkv's `to_qkv`, fuse_swiglu's
`img_mlp.gate_up`), standard LoRAs on their parts (q/k/v, gate_layer/proj) become one merged LoRA per projection
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
from .algebra import (QKV, LoraFactors, block_columns, config_kwargs, convert, merged_parts, part_of, row_splits,
                      to_merged, to_standard)
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
    groups = row_splits()
    for name, f in modules.items():
        rows = slice(None)
        lin = _linear(model, name)
        part = part_of(name, groups) if lin is None else None
        if part is not None:  # a part on a model that holds it merged (to_qkv, gate_up): its row slice there
            merged, i, k = part
            lin = _linear(model, merged)
            if lin is not None:
                n = lin.out_features // k
                rows = slice(i * n, (i + 1) * n)
        found = merged_parts(name, groups) if lin is None else None
        parts = [_linear(model, p) for p in found[0]] if found else []
        if lin is None and parts and all(parts):  # a merged target on a model that holds its parts: stacked
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
        if any(f.magnitude is not None for f in parsed.modules.values()):
            raise ValueError("a DoRA adapter cannot be added into the base weights by load_lora(fuse=True); load it "
                             "as an adapter and call transformer.fuse_lora() (peft's DoRA merge)")
        modules = as_model_holds(model, to_standard(parsed.modules, QKV) if not fused else parsed.modules,
                                  merge=False)
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
    modules = as_model_holds(model, to_merged(parsed.modules) if fused else to_standard(parsed.modules, QKV))
    plan_targets(model, modules)  # all names exist as plain modules now; shapes fit
    inject_adapter(model, modules, adapter_name, scale)
    return model


def as_model_holds(model, modules, merge=True):
    """`modules` with each merged target beyond q/k/v (2.1's `img_mlp.gate_up`) split into its parts where the
    model holds the parts, and (`merge`) the parts merged where it holds the merged module, exactly (block-diagonal
    B, like q/k/v onto to_qkv). q/k/v follow `is_fused` (the callers convert them)."""
    extra = {m: g for m, g in row_splits().items() if m not in QKV}
    split = {n for n in modules if merged_parts(n, extra) and _linear(model, n) is None}
    out = {**{n: f for n, f in modules.items() if n not in split},
           **to_standard({n: modules[n] for n in split}, extra)}
    if not merge:
        return out
    joined = {n for n in out if (p := part_of(n, extra)) and _linear(model, n) is None
              and _linear(model, p[0]) is not None}
    return {**{n: f for n, f in out.items() if n not in joined}, **to_merged({n: out[n] for n in joined}, extra)}


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
        if f.magnitude is not None:
            state_dict[f"{name}.lora_magnitude_vector"] = f.magnitude
    config = {k: v for k, v in (base_config or {}).items() if k != "peft_type"}
    config.update(config_kwargs(modules), use_rslora=False, layers_to_transform=None, layers_pattern=None,
                  exclude_modules=None, lora_bias=any(f.bias is not None for f in modules.values()),
                  use_dora=any(f.magnitude is not None for f in modules.values()))
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
            found = merged_parts(name, row_splits()) if name in modules else None
            if found is not None:
                _keep_block_diagonal(mod, adapter_name, modules[name].cols, len(found[0]))


def _keep_block_diagonal(layer, adapter_name, cols=None, k=3):
    """A block-diagonal merged B (standard LoRAs on its `k` parts) keeps zero off-diagonal blocks while training."""
    if cols is None:
        cols = block_columns(layer.lora_B[adapter_name].weight.detach(), k)
    if cols is not None:
        _register_mask(layer, adapter_name, {i: c for i, c in enumerate(cols) if len(c)}, k)


def _register_mask(layer, adapter_name, cols, k=3):
    """Zero B outside the blocks `cols` (part index -> its rank columns; `k` parts, q/k/v: 3), in the weight and
    its gradient, and a LoRA bias (lora_bias) on the rows of parts without a LoRA: stock has no LoRA there at all."""
    b = layer.lora_B[adapter_name].weight
    n = b.shape[0] // k
    mask = torch.zeros(b.shape, dtype=torch.float32)
    for i, c in cols.items():
        mask[i * n:(i + 1) * n, c.cpu()] = 1
    params = [(b, mask)]
    if layer.lora_B[adapter_name].bias is not None:
        params.append((layer.lora_B[adapter_name].bias, mask.amax(1)))  # the rows of parts with a LoRA
    for p, m in params:
        with torch.no_grad():
            p.mul_(m.to(p.device, p.dtype))
        p.register_hook(lambda g, m=m: g * m.to(g.device, g.dtype))
    layer._qwen_fused_block_mask = getattr(layer, "_qwen_fused_block_mask", {}) | {adapter_name: mask}


# ----------------------------------------------------------------------------------------------------------
# peft adapters on a fused model

def _peft_add_adapter(model, config, adapter_name):
    """diffusers' own `add_adapter` (the class method: a fused model's instance routes its `add_adapter` here)."""
    type(model).add_adapter(model, config, adapter_name)


def add_lora(transformer_or_pipeline, config, adapter_name="default"):
    """`transformer.add_adapter(config, adapter_name)`, mapping the stock targets a model holds merged.

    On a model with merged projections (fuse_qkv's `to_qkv`, fuse_swiglu's `img_mlp.gate_up`), the parts the
    config would target on the stock model (q/k/v, gate_layer/proj) become the merged projection with rank the
    sum of the parts' ranks, scale alpha/r, and a block-diagonal B whose off-diagonal blocks stay zero: the same
    model as stock peft, trained the same way (one warning line says so). Every factor (and a DoRA magnitude) is
    initialised to the numbers stock peft gives its stock module from the same random state (`_init_as_stock`);
    inits that need more than the module itself raise. Other targets (a merged module named itself included) are
    unchanged. Models holding nothing merged get `add_adapter(config)` as is. Returns the transformer.
    """
    model = transformer_of(transformer_or_pipeline)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter name {adapter_name!r} already exists on this transformer")
    if not holds_merged(model):
        _peft_add_adapter(model, config, adapter_name)
        return model
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # peft expands its shorthand to every nn.Linear of the model it is given (a diffusers model has no output
        # head to leave out); on the stock model those are the parts, not the merged projection
        groups = row_splits()
        config = dataclasses.replace(config, target_modules={
            n for n in stock_linears(model) if not _holds_parts_merged(model, n, groups)})
    groups, sizes, targets, mapped = collections.defaultdict(dict), {}, {}, set()
    stock_order = stock_targets(model, config)
    both = sorted({h[0] for n in stock_order if (h := held_merged(model, n))} & set(stock_order))
    if both and not isinstance(config.target_modules, str):
        raise ValueError(f"target_modules selects {both[0]} both itself and through its parts; name the merged "
                         f"module or its parts ({_parts_kind(both[0])}), not both")
    # a regex selects on the stock model, which has the parts and not the merged module
    stock_order = {n: v for n, v in stock_order.items() if n not in both}
    for name, (r, alpha) in stock_order.items():
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        held = held_merged(model, name)
        if held is not None:
            merged, i, sizes[merged] = held
            groups[merged][i] = (r, scale)
            mapped.add(name.rsplit(".", 1)[-1])
        else:
            targets[name] = (r, alpha)
    if not mapped:
        _peft_add_adapter(model, config, adapter_name)
        return model
    partial = sorted(n for n, parts in groups.items() if len(parts) != sizes[n])
    if config.use_dora and partial:
        kinds = " and ".join(sorted({_parts_kind(n) for n in partial}))
        raise ValueError(f"DoRA on only some {kinds} parts of {', '.join(partial[:4])} is not one merged DoRA layer; "
                         f"target all parts of each merged projection, or add it on the unfused model (before "
                         f"fuse_qkv / fuse_swiglu)")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_WHOLE_MODULE_INITS):
        raise ValueError(f"init_lora_weights={init!r} cannot be built per q/k/v part (or gate_layer/proj part) of a "
                         f"merged projection (it needs statistics peft gathers per stock module, or a LoRA variant "
                         f"keyed on the init); initialise on the unfused model, or use True, False, 'gaussian', "
                         f"'pissa', 'olora' or 'orthogonal'")
    blocks = {}
    for name, parts in groups.items():
        scales = {s for _, s in parts.values()}
        if len(scales) > 1:
            raise ValueError(f"{name}: {_parts_kind(name)} parts have different LoRA scales {sorted(scales)}; one "
                             f"merged adapter has one scale")
        rank = sum(r for r, _ in parts.values())
        s = scales.pop()
        targets[name] = (rank, s * math.sqrt(rank) if config.use_rslora else s * rank)
        blocks[name] = [(i, parts[i][0]) for i in sorted(parts)]
    warnings.warn(f"qwen_fused: LoRA targets {', '.join(sorted(mapped))} mapped to the merged "
                  f"{'/'.join(sorted({n.rsplit('.', 1)[-1] for n in groups}))} of this fused model (block-diagonal, "
                  f"same model as stock)", stacklevel=2)
    # peft builds the merged layers without drawing anything that matters (init False: no base weight changes);
    # then every stock module's factors are drawn as stock peft draws them, in its order, from the same stream
    rng = torch.get_rng_state()
    merged_config = dataclasses.replace(config, **config_kwargs(targets), layers_to_transform=None,
                                        layers_pattern=None, exclude_modules=None, init_lora_weights=False)
    _peft_add_adapter(model, merged_config, adapter_name)
    model.peft_config[adapter_name].init_lora_weights = init
    columns = {}  # stock part name -> its rank columns of the merged layer
    for name, parts in blocks.items():
        names = merged_parts(name, row_splits())[0]
        start, cols = 0, {}
        for i, r in parts:
            cols[i] = torch.arange(start, start + r)
            columns[names[i]], start = slice(start, start + r), start + r
        _register_mask(model.get_submodule(name), adapter_name, cols, sizes[name])
    torch.set_rng_state(rng)
    for name, rank_alpha in stock_order.items():
        _init_as_stock(model, config, adapter_name, name, rank_alpha, columns)
    return model


def _parts_kind(merged):
    """What the parts of merged projection `merged` are called in messages: "q/k/v", "gate_layer/proj"."""
    if merged.rsplit(".", 1)[-1] in QKV:
        return "q/k/v"
    return "/".join(p.rsplit(".", 1)[-1] for p in merged_parts(merged, row_splits())[0])


def held_merged(model, name):
    """`(merged module name, part index, number of parts)` when the model holds stock module `name` as rows of a
    merged projection (to_qkv, gate_up) rather than as its own module, else None."""
    part = part_of(name, row_splits())
    if part is None or _linear(model, name) is not None or _linear(model, part[0]) is None:
        return None
    return part


def _holds_parts_merged(model, name, groups):
    """True when module `name` is a merged projection the model holds instead of its parts (not diffusers'
    `fuse_projections`, which adds a `to_qkv` beside them)."""
    found = merged_parts(name, groups)
    return bool(found) and _linear(model, name) is not None and all(_linear(model, p) is None for p in found[0])


def holds_merged(model):
    """True when the model holds any stock projection merged (fuse_qkv's to_qkv, fuse_swiglu's gate_up)."""
    groups = row_splits()
    return any(_holds_parts_merged(model, name, groups) for name, _ in model.named_modules() if ".lora_" not in name)


def stock_modules(model):
    """`(name, module)` for the modules of the stock model, in its module order (what peft walks), as this model
    holds them: a merged projection comes at the place of its first stock part, followed by its parts (module
    None: they exist on the stock model only), in the order the stock module registers them. A module that merges
    its children (`MergedSwiGLU`) names the stock module's order in `STOCK_CHILDREN`. The children of peft's LoRA
    layers are not listed (the stock model's own LoRA layers are the callers' business)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    groups = row_splits()
    done = set()

    def merged_here(full, child, parts=True):
        done.add(full)
        yield from walk(full, child)
        for p in merged_parts(full, groups)[1] if parts else ():
            yield p, None

    def walk(prefix, mod):
        yield prefix, mod
        if isinstance(mod, BaseTunerLayer):
            return
        order = getattr(mod, "STOCK_CHILDREN", None)
        for c in order if order is not None else list(mod._modules):
            full = f"{prefix}.{c}" if prefix else c
            child = mod._modules.get(c)
            if child is not None and _holds_parts_merged(model, full, groups):
                yield from merged_here(full, child)
            elif child is not None:
                yield from walk(full, child)
            elif order is not None:  # a stock child this module holds merged into a sibling (or does not need)
                held = held_merged(model, full)
                if held is not None and held[0] not in done:
                    yield from merged_here(held[0], model.get_submodule(held[0]), parts=False)
                yield full, None

    yield from walk("", model)


def stock_linears(model):
    """The names of the stock model's Linear layers, in its module order (`stock_modules`): a merged projection's
    parts in the stock module's order, after the merged projection itself (which the stock model lacks: a config
    names it only to target the merged module as such)."""
    groups = row_splits()
    return [name for name, mod in stock_modules(model)
            if (part_of(name, groups) is not None if mod is None else isinstance(getattr(mod, "base_layer", mod),
                                                                                   nn.Linear))]


def stock_targets(model, config):
    """{stock module name: (r, lora_alpha)} that peft's `config` selects on the stock model, in the order stock peft
    creates them."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    return {n: (config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), n), config.r),
                config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), n), config.lora_alpha))
            for n in stock_linears(model) if check_target_module_exists(config, n)}


# peft inits that cannot be made per part of a merged projection (q/k/v, gate_layer/proj): EVA, CorDA and LoRA-GA
# use statistics gathered per stock module name from data; MiCA is a LoRA variant chosen by the init (frozen B)
_WHOLE_MODULE_INITS = ("eva", "corda", "lora_ga", "mica")


def _init_as_stock(model, config, adapter_name, name, rank_alpha, columns):
    """Initialise stock module `name`'s LoRA factors (a part of a merged projection: its rows and rank columns
    `columns[name]` of the merged layer) to exactly what stock peft gives them."""
    stock = stock_lora_layer(model, config, adapter_name, name, rank_alpha)
    layer, rows = _stock_part(model, name)
    cols = columns.get(name, slice(None))
    with torch.no_grad():
        layer.lora_A[adapter_name].weight[cols] = stock.lora_A[adapter_name].weight
        layer.lora_B[adapter_name].weight[rows, cols] = stock.lora_B[adapter_name].weight
        if stock.lora_B[adapter_name].bias is not None:
            layer.lora_B[adapter_name].bias[rows] = stock.lora_B[adapter_name].bias
        if adapter_name in stock.lora_magnitude_vector:
            layer.lora_magnitude_vector[adapter_name].weight[rows] = stock.lora_magnitude_vector[adapter_name].weight


def _stock_part(model, name):
    """`(module, rows)`: the module that holds stock module `name`'s weight and its rows there (itself, or a part's
    rows of a merged projection: q/k/v in to_qkv, gate_layer/proj in gate_up)."""
    held = held_merged(model, name)
    if held is not None:
        merged, i, k = held
        n = _linear(model, merged).out_features // k
        return model.get_submodule(merged), slice(i * n, (i + 1) * n)
    return model.get_submodule(name), slice(None)


def stock_lora_layer(model, config, adapter_name, name, rank_alpha):
    """The peft LoRA layer stock peft builds at stock module `name` under `config`, built over that module's own
    weight (a view of its rows of a merged projection): every init draws what stock draws from the global stream
    when called in stock order, and sees the part's weight; inits that replace the base weight (PiSSA, OLoRA,
    LoftQ) write those rows back, and DoRA's magnitude is the part's own."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    mod, rows = _stock_part(model, name)
    base = getattr(mod, "base_layer", mod)
    weight = base.weight.data[rows]
    part = nn.Linear(base.in_features, weight.shape[0], bias=base.bias is not None, device="meta")
    part.weight = nn.Parameter(weight, requires_grad=False)
    if base.bias is not None:
        part.bias = nn.Parameter(base.bias.data[rows], requires_grad=False)
    r, alpha = rank_alpha
    stock = LoraLinear(part, adapter_name, config=config, r=r, lora_alpha=alpha, target_name=name)
    if part.weight.data.data_ptr() != weight.data_ptr():  # the init replaced the base weight
        weight.copy_(part.weight.data)
    return stock


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
        dora = bool(mod.use_dora.get(adapter_name))
        if adapter_name in getattr(mod, "lora_variant", {}) and not dora:
            raise ValueError(f"{name}: adapter {adapter_name!r} is a LoRA variant other than DoRA; not saved as LoRA")
        r = mod.r[adapter_name]
        scale = mod.lora_alpha[adapter_name] / (math.sqrt(r) if mod.use_rslora.get(adapter_name) else r)
        bias = getattr(mod.lora_B[adapter_name], "bias", None)
        mask = getattr(mod, "_qwen_fused_block_mask", {}).get(adapter_name)
        k = len(merged_parts(name, row_splits())[0]) if mask is not None else 0
        cols = None if mask is None else [blk.any(0).nonzero().flatten() for blk in mask.chunk(k)]
        magnitude = mod.lora_magnitude_vector[adapter_name].weight.detach() if dora else None
        modules[name] = LoraFactors(mod.lora_A[adapter_name].weight.detach(), mod.lora_B[adapter_name].weight.detach(),
                                    scale * r, None if bias is None else bias.detach(), cols, magnitude)
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
        modules = {n: dataclasses.replace(f, **{k: getattr(f, k).to(dtype) for k in ("a", "b", "bias", "magnitude")
                                                 if getattr(f, k) is not None}) for n, f in modules.items()}
    return write_lora(modules, path, layout=layout, overwrite=overwrite)
