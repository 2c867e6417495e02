"""diffusers' own LoRA API on a fused model, and the binding that puts it on every fused model.

`fuse_qkv` binds `add_adapter`, `load_lora_adapter` and `save_lora_adapter` on the fused transformer's instance
(`bind_lora_api`, registered by the package root: see qwen_fused/bindings.py) and wraps the Qwen pipelines'
`save_lora_weights`, so diffusers' loaders never silently drop q/k/v on the merged projections and LoRA files stay
in the standard layout that stock tools read.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..names import STANDARD, STREAMS
from .adapters import add_lora, inject_adapter, lora_from_model, peft_adapter, plan_targets
from .algebra import apply_config, to_merged, to_standard
from .formats import parse_lora


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
    plan_targets(model, merged)
    adapter_name = kwargs.pop("adapter_name", None) or get_adapter_name(model)
    if adapter_name in getattr(model, "peft_config", {}) and not hotswap:
        raise ValueError(f"Adapter name {adapter_name} already in use in the model - please select a new adapter "
                         f"name.")
    inject_adapter(model, merged, adapter_name, base_config=config, hotswap=hotswap, **kwargs)


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
# the binding every fused model gets (registered by the package root, run by fuse_qkv)

# diffusers' LoRA entry points that must see standard q/k/v names on a fused model, and their fused versions
LORA_API = {"add_adapter": add_lora, "load_lora_adapter": fused_load_lora_adapter,
            "save_lora_adapter": fused_save_lora_adapter}


def bind_lora_api(model):
    """Instance-level: standard q/k/v names in `add_adapter` configs and in LoRA files map onto the merged
    projections exactly, and saved files come out in the standard layout, instead of peft silently finding no
    `to_q` on this model."""
    for name, impl in LORA_API.items():
        setattr(model, name, functools.partial(impl, model))
    wrap_pipeline_lora_saving()


def unbind_lora_api(model):
    """Undo `bind_lora_api` (unfusing): the class's own methods again."""
    for name in LORA_API:
        model.__dict__.pop(name, None)
