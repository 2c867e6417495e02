"""diffusers' own LoRA API on a fused model, and the binding that puts it on every fused model.

`fuse_qkv` and `fuse_swiglu` bind `add_adapter`, `load_lora_adapter` and `save_lora_adapter` on the fused
transformer's instance (`bind_lora_api`, registered by the package root: see qwen_fused/bindings.py) and wrap the
Qwen pipelines' `save_lora_weights`, so diffusers' loaders never silently drop q/k/v or gate_layer/proj on the merged
projections (to_qkv, gate_up) and LoRA files stay in the standard layout that stock tools read.
"""
from __future__ import annotations

import functools
import re
import types

import torch

from ..fuse import is_fused
from .adapters import (add_lora, as_model_holds, held_merged, holds_merged, inject_adapter, lora_from_model,
                       peft_adapter, plan_targets, stock_linears, stock_lora_layer, stock_modules, stock_targets)
from .algebra import QKV, apply_config, merged_parts, row_splits, to_merged, to_standard
from .formats import _meta_models, parse_lora


def standard_in_stock_order(modules, model=None):
    """`to_standard(modules)` in the stock model's module order, as stock's state dicts (and so its pickle files)
    list them: `to_standard` puts a merged projection's parts together, where the stock module may register others
    between them (2.1's MLP: proj, out, gate_layer). The order comes from `model` (`stock_modules`), else, when
    the LoRA has a merged target beyond q/k/v (those come out in stock order already), from the module tree of the
    one family that knows every name (its meta model, whose one block stands for all); else it is kept."""
    out = to_standard(modules)
    if model is not None:
        trees = [[n for n, _ in stock_modules(model)]]
    elif any(merged_parts(n, {m: g for m, g in row_splits().items() if m not in QKV}) for n in modules):
        trees = [[n for n, _ in meta.named_modules()] for meta in _meta_models()]
    else:
        return out
    for tree in trees:
        pos = {n: i for i, n in enumerate(tree)}
        keys = {}
        for name in out:
            m = re.fullmatch(r"(transformer_blocks)\.(\d+)\.(.+)", name) if model is None else None
            key = (pos.get(m[1]), int(m[2]), pos.get(f"{m[1]}.0.{m[3]}")) if m else (pos.get(name), 0, 0)
            if None in key:
                break
            keys[name] = key
        else:
            return dict(sorted(out.items(), key=lambda kv: keys[kv[0]]))
    return out


def _has_merged(names):
    """True when a LoRA (state dict keys or module names) has a merged target (to_qkv, gate_up, ...)."""
    groups = row_splits()
    return any(merged_parts(n.split(".lora_")[0], groups) for n in names)


def fused_load_lora_adapter(model, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False,
                            **kwargs):
    """diffusers' `load_lora_adapter` on a fused model (also what `pipe.load_lora_weights` calls).

    A LoRA with standard targets the model holds merged (q/k/v in to_qkv, gate_layer/proj in gate_up) is built into
    the peft config diffusers would build on the stock model, completed as stock peft completes it
    (`_as_stock_loads`: keys it does not load and factors the file lacks, with stock's warning), converted exactly to
    the merged projections (block-diagonal B, kept so while training; DoRA magnitudes stacked by rows) and loaded
    through diffusers' own loader. Without such targets this is diffusers' loader unchanged.
    """
    from diffusers.loaders.lora_base import _fetch_state_dict
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config, _maybe_warn_for_unhandled_keys, get_adapter_name

    fetch = {k: kwargs.pop(k, None) for k in ("weight_name", "use_safetensors", "local_files_only", "cache_dir",
                                              "proxies", "token", "revision", "subfolder")}
    state_dict, metadata = _fetch_state_dict(
        pretrained_model_name_or_path_or_dict, force_download=kwargs.pop("force_download", False),
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"}, allow_pickle=False,
        metadata=kwargs.pop("metadata", None), **fetch)
    ours = state_dict
    if prefix is not None:
        ours = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if not any(held_merged(model, m) for m in {k.split(".lora_")[0] for k in ours}):
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
    adapter_name = kwargs.pop("adapter_name", None) or get_adapter_name(model)
    if adapter_name in getattr(model, "peft_config", {}) and not hotswap:
        raise ValueError(f"Adapter name {adapter_name} already in use in the model - please select a new adapter "
                         f"name.")
    ranks = {f"^{k}": v.shape[1] for k, v in ours.items() if "lora_B" in k and v.ndim > 1}
    # the config stock diffusers builds for this LoRA: every module's rank and scale come from it
    lora_config = _create_lora_config(ours, network_alphas, metadata, ranks)
    config = lora_config.to_dict()
    ours, incompatible = _as_stock_loads(model, ours, lora_config, adapter_name,
                                         draw=not (hotswap or kwargs.get("low_cpu_mem_usage")))
    modules = apply_config(parse_lora(ours, model=model).modules, config)
    merged = as_model_holds(model, to_merged(modules) if is_fused(model) else modules)
    plan_targets(model, merged)
    if hotswap and adapter_name in getattr(model, "peft_config", {}):
        _prepare_hotswap(model, adapter_name, lora_config, merged, config)
    prepared = getattr(model, "_prepare_lora_hotswap_kwargs", None)
    if prepared is not None and not hotswap:
        # enable_lora_hotswap(target_rank) names a stock module's rank; a merged projection holds its parts side
        # by side (q/k/v: rank r_q + r_k + r_v), so every layer is padded to three times it (zeros: exact)
        model._prepare_lora_hotswap_kwargs = {**prepared, "target_rank": 3 * prepared["target_rank"]}
    with torch.random.fork_rng(devices=[]):  # the stock stream is drawn already: the merged layers draw nothing
        inject_adapter(model, merged, adapter_name, base_config=config, hotswap=hotswap, **kwargs)
    model.__dict__.setdefault("_qwen_fused_stock_lora_configs", {})[adapter_name] = lora_config
    _maybe_warn_for_unhandled_keys(incompatible, adapter_name)


def _prepare_hotswap(model, adapter_name, stock_config, merged, config):
    """peft refuses to hotswap a LoRA whose config is not compatible with the loaded one's: check that on the configs
    stock diffusers builds for both. The merged layers' own configs carry each module's exact scale in alpha_pattern,
    which hotswapping swaps with the weights, so the loaded one takes the new one's."""
    from peft.utils.hotswap import check_hotswap_configs_compatible

    first = getattr(model, "_qwen_fused_stock_lora_configs", {}).get(adapter_name)
    if first is not None:
        check_hotswap_configs_compatible(first, stock_config)
    model.peft_config[adapter_name].alpha_pattern = peft_adapter(merged, config)[1]["alpha_pattern"]


# file key suffix -> the parameter peft loads it into (`{}`: the adapter name); any other key it reports unexpected
_LOADED = {"lora_A.weight": "lora_A.{}.weight", "lora_B.weight": "lora_B.{}.weight", "lora_B.bias": "lora_B.{}.bias",
           "lora_magnitude_vector": "lora_magnitude_vector.{}.weight"}


def _as_stock_loads(model, state_dict, config, adapter_name, draw=True):
    """`(state dict, incompatible keys)`: what stock diffusers + peft load from `state_dict` (peft layout, standard
    names) on the stock model. Keys peft would not load (unknown kinds, modules the model lacks) are dropped (stock
    warns about them). Stock peft first builds and initialises every layer the config targets (`draw`; not when
    hotswapping or with low_cpu_mem_usage, where it builds on the meta device): that is done here in stock order,
    so the random stream advances as stock's, inits that change base weights (PiSSA, ...) change them as on stock,
    and factors the file lacks keep the values stock gives them (stock warns about them as missing keys, with its
    parameter names)."""
    modules = set(stock_linears(model))
    unexpected = [k for k in state_dict if not any(k.endswith(f".{p}") and k[:-len(p) - 1] in modules
                                                   for p in _LOADED)]
    state_dict = {k: v for k, v in state_dict.items() if k not in unexpected}
    params = ["lora_A.weight", "lora_B.weight"] + ["lora_B.bias"] * bool(config.lora_bias) + \
        ["lora_magnitude_vector"] * bool(config.use_dora)
    targets = stock_targets(model, config)
    missing = [(n, p) for n in targets for p in params if f"{n}.{p}" not in state_dict]
    if missing and not draw:
        raise ValueError(f"this LoRA lacks {len(missing)} factors ({', '.join(f'{n}.{p}' for n, p in missing[:4])}"
                         f"); stock peft would leave them uninitialised on the meta device here (hotswap or "
                         f"low_cpu_mem_usage): load it without either")
    for name, rank_alpha in targets.items() if draw else ():
        stock = stock_lora_layer(model, config, adapter_name, name, rank_alpha)
        for p in params:
            state_dict.setdefault(f"{name}.{p}", stock.get_parameter(_LOADED[p].format(adapter_name)).detach())
    missing_keys = [f"{n}.{_LOADED[p].format(adapter_name)}" for n, p in missing]
    return state_dict, types.SimpleNamespace(
        missing_keys=missing_keys, unexpected_keys=_in_stock_order(model, unexpected, targets) if unexpected else [])


def _in_stock_order(model, keys, targets):
    """`keys` in the order torch's `load_state_dict` reports them unexpected on the stock peft model: by the module
    (in module order) below which the key names nothing, then as given."""
    order = []
    for n, _ in stock_modules(model):  # without this model's own peft layers' children: the stock model's follow
        order.append(n)
        if n in targets:  # a peft LoRA layer's children, in the order it registers them
            order += [f"{n}.{c}" for c in ("base_layer", "lora_dropout", "lora_A", "lora_B", "lora_magnitude_vector")]
    index = {n: i for i, n in enumerate(order)}

    def owner(key):
        parts = key.split(".")
        return next(index[p] for p in (".".join(parts[:n]) for n in range(len(parts) - 1, -1, -1)) if p in index)

    return sorted(keys, key=owner)


def fused_save_lora_adapter(model, save_directory, adapter_name="default", upcast_before_saving=False,
                            safe_serialization=True, weight_name=None):
    """diffusers' `save_lora_adapter` on a fused model: merged LoRAs (to_qkv, gate_up) are written in the standard
    layout (exactly: each part's own factors where B is block-diagonal, the shared A otherwise), with the LoraConfig
    metadata that gives every module its scale."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from diffusers.utils.peft_utils import get_adapter_name

    if adapter_name is None:
        adapter_name = get_adapter_name(model)
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter name {adapter_name} not found in the model.")
    if upcast_before_saving:  # as stock diffusers: the model itself is cast to fp32 (`self.to(dtype=torch.float32)`)
        model.to(dtype=torch.float32)
    modules = lora_from_model(model, adapter_name)
    if not _has_merged(modules):
        return type(model).save_lora_adapter(model, save_directory, adapter_name, upcast_before_saving,
                                             safe_serialization, weight_name)
    state_dict, config = peft_adapter(standard_in_stock_order(modules, model),
                                      model.peft_config[adapter_name].to_dict())
    # own contiguous tensors: the parts are views of one merged B, which safetensors refuses
    state_dict = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}
    LoraBaseMixin.write_lora_layers(state_dict, save_directory, is_main_process=True, weight_name=weight_name,
                                    save_function=None, safe_serialization=safe_serialization,
                                    lora_adapter_metadata=config if safe_serialization else None)


def standard_lora_layers(state_dict, config=None):
    """A peft LoRA state dict and its LoraConfig kwargs (None: diffusers' defaults, scale 1) with merged targets
    (to_qkv, gate_up) -> the same LoRA with standard targets, exactly: `(state_dict, config)`."""
    modules = apply_config(parse_lora(state_dict).modules, dict(config or {}))
    state_dict, config = peft_adapter(standard_in_stock_order(modules), config)
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
        if isinstance(layers, dict) and _has_merged(layers):
            metadata = bound.arguments.get("transformer_lora_adapter_metadata")
            layers, config = standard_lora_layers(layers, metadata)
            bound.arguments["transformer_lora_layers"] = layers
            if metadata is not None:  # as stock: no metadata given, none written (and pickle files take none)
                bound.arguments["transformer_lora_adapter_metadata"] = config
        return func(*bound.args, **bound.kwargs)

    save_lora_weights._qwen_fused = True
    QwenImageLoraLoaderMixin.save_lora_weights = classmethod(save_lora_weights)


# ----------------------------------------------------------------------------------------------------------
# the binding every fused model gets (registered by the package root, run by fuse_qkv and fuse_swiglu)

# diffusers' LoRA entry points that must see standard q/k/v names on a fused model, and their fused versions
LORA_API = {"add_adapter": add_lora, "load_lora_adapter": fused_load_lora_adapter,
            "save_lora_adapter": fused_save_lora_adapter}


def bind_lora_api(model):
    """Instance-level: standard names (q/k/v, gate_layer/proj) in `add_adapter` configs and in LoRA files map onto
    the merged projections exactly, and saved files come out in the standard layout, instead of peft silently
    finding no `to_q` or `gate_layer` on this model."""
    for name, impl in LORA_API.items():
        setattr(model, name, functools.partial(impl, model))
    wrap_pipeline_lora_saving()


def unbind_lora_api(model):
    """Undo `bind_lora_api` (unfusing): the class's own methods again, once the model holds nothing merged (after
    unfuse_qkv a merged MLP still needs the binding, and after unfuse_swiglu a to_qkv)."""
    if holds_merged(model):
        return
    for name in LORA_API:
        model.__dict__.pop(name, None)
