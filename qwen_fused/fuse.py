"""Convert a diffusers Qwen-Image transformer (any family in qwen_fused/families/) to the merged-QKV layout in
place, and back. What differs between families (which modules merge, the processors, the RoPE hook) comes from
the family; this module is the shared entry."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from . import bindings
from .families import transformer_and_family

_HOOK_ATTR = "_qwen_fused_rope_hook"


def transformer_of(obj):
    """The transformer inside `obj` (a transformer of a known family, or a pipeline holding one)."""
    return transformer_and_family(obj)[0]


def is_fused(model_or_pipeline) -> bool:
    """True when every block of the transformer carries the merged projections (`to_qkv`, and `add_qkv_proj` for
    the double-stream family) and none of the stock ones. diffusers' own `fuse_projections` adds a `to_qkv` beside
    `to_q/k/v`: that is not fused here."""
    model, family = transformer_and_family(model_or_pipeline)
    attns = family.attentions(model)
    return bool(attns) and all(_merged_state(attn, family) == "fused" for _, attn in attns)


def _merged_state(attn, family):
    """"fused" (merged projections only), "stock" (stock parts only) or "both" (diffusers' fuse_projections)."""
    merged = any(hasattr(attn, m) for m in family.STREAMS)
    stock = any(hasattr(attn, n) for parts in family.STREAMS.values() for n in parts)
    return "both" if merged and stock else "fused" if merged else "stock"


def _peft_layers(attn, names):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n in names if isinstance(getattr(attn, n, None), BaseTunerLayer)]


def _set_modules(attn, drop, add, anchor):
    """Replace modules `drop` by `add` (name -> module) at the position of `anchor`, keeping the others' order."""
    new = OrderedDict()
    for name, mod in attn._modules.items():
        if name == anchor:
            new.update(add)
        if name not in drop:
            new[name] = mod
    attn._modules = new


def _merged_linear(parts):
    """One Linear whose weight/bias are the row-concatenation of `parts` (no random init, same device/dtype)."""
    first = parts[0]
    for p in parts:
        if type(p) is not nn.Linear:
            raise TypeError(f"cannot fuse a {type(p).__name__}; expected torch.nn.Linear")
        if p.in_features != first.in_features or (p.bias is None) != (first.bias is None):
            raise ValueError("q/k/v projections disagree in input size or bias; not a Qwen-Image attention")
    out_features = sum(p.out_features for p in parts)
    merged = nn.Linear(first.in_features, out_features, bias=first.bias is not None, device="meta")
    with torch.no_grad():
        merged.weight = nn.Parameter(torch.cat([p.weight for p in parts]),
                                     requires_grad=any(p.weight.requires_grad for p in parts))
        if first.bias is not None:
            merged.bias = nn.Parameter(torch.cat([p.bias for p in parts]),
                                       requires_grad=any(p.bias.requires_grad for p in parts))
    return merged


def _split_linear(merged, n):
    size = merged.out_features // n
    parts = []
    with torch.no_grad():
        for i in range(n):
            lin = nn.Linear(merged.in_features, size, bias=merged.bias is not None, device="meta")
            lin.weight = nn.Parameter(merged.weight[i * size:(i + 1) * size].clone(),
                                      requires_grad=merged.weight.requires_grad)
            if merged.bias is not None:
                lin.bias = nn.Parameter(merged.bias[i * size:(i + 1) * size].clone(),
                                        requires_grad=merged.bias.requires_grad)
            parts.append(lin)
    return parts


def _check_stock(name, attn, family):
    from diffusers.models.normalization import RMSNorm

    stock = tuple(family.processors())
    fused = tuple(family.processors().values())
    # fused processors subclass the stock ones (2.1): an instance of a fused class is not a stock processor
    if not isinstance(attn.processor, stock) or isinstance(attn.processor, fused):
        raise TypeError(f"{name} uses processor {type(attn.processor).__name__}; fuse_qkv only replaces "
                        f"{' or '.join(c.__name__ for c in stock)}")
    streams = family.STREAMS
    missing = [n for names in streams.values() for n in names if getattr(attn, n, None) is None]
    if missing:
        raise TypeError(f"{name} has no {', '.join(missing)}; not a {family.model_class().__name__} attention")
    peft = _peft_layers(attn, [n for names in streams.values() for n in names])
    if peft:
        raise ValueError(
            f"{name}.{peft[0]} carries a peft LoRA adapter. Fuse the QKV projections first and load the LoRA "
            f"afterwards with qwen_fused.load_lora(transformer, path), or bake it into the base weights with "
            f"transformer.fuse_lora() and transformer.unload_lora() before calling fuse_qkv."
        )
    hooked = [n for names in streams.values() for n in names
              if hasattr(getattr(attn, n), "_hf_hook") or hasattr(getattr(attn, n), "_diffusers_hook")]
    if hooked:
        # accelerate offload hooks and diffusers hooks (layerwise casting, group offloading) live on the modules
        # that fusing replaces: the merged projection would silently run without them
        raise ValueError(
            f"{name}.{hooked[0]} carries accelerate/diffusers hooks (CPU offload, layerwise casting or group "
            f"offloading). Call qwen_fused.fuse_qkv before enabling them."
        )
    norms = [getattr(attn, n, None) for n in family.NORMS]
    if any(n is not None and (type(n) is not RMSNorm or n.weight is None) for n in norms):
        raise TypeError(f"{name}: fused epilogue supports RMSNorm (with weight) QK norms only")
    if len({n.eps for n in norms if n is not None}) > 1:
        raise ValueError(f"{name}: QK norms have different eps")


def fuse_qkv(model_or_pipeline):
    """Merge each block's q/k/v projections (every stream) into `to_qkv` (and `add_qkv_proj`), in place.

    Works block by block and frees the old parameters as it goes, so peak memory grows by one block's
    projections, not by the model. Keeps device, dtype and requires_grad; works on meta-device models.
    Returns the transformer.
    """
    model, family = transformer_and_family(model_or_pipeline)
    attns = family.attentions(model)
    states = {_merged_state(attn, family) for _, attn in attns}
    if "both" in states:
        raise ValueError("this transformer has diffusers' fuse_projections applied (to_qkv beside to_q/k/v); call "
                         "transformer.unfuse_qkv_projections() before qwen_fused.fuse_qkv")
    if "fused" in states:
        raise ValueError("this transformer is already fused (its blocks have to_qkv); call unfuse_qkv first")
    if not attns:
        raise ValueError("transformer has no transformer_blocks to fuse")
    for name, attn in attns:  # validate everything before changing anything
        _check_stock(name, attn, family)
    bindings.require()
    pairs = family.processors()
    for _, attn in attns:
        stock = attn.processor
        for merged_name, names in family.STREAMS.items():
            merged = _merged_linear([getattr(attn, n) for n in names])
            _set_modules(attn, drop=set(names), add={merged_name: merged},
                         anchor=family.STOCK_ORDER[merged_name][0])
        proc = next(f for s, f in pairs.items() if isinstance(stock, s))()
        proc._attention_backend = stock._attention_backend
        proc._parallel_config = stock._parallel_config
        attn.set_processor(proc)
    setattr(model, _HOOK_ATTR, model.pos_embed.register_forward_hook(family.POS_EMBED_HOOK))
    # diffusers' LoRA API, rebound for the merged layout on this instance. The LoRA layer provides it, and this
    # module sits below that layer and must not import it: the package root registers it in qwen_fused.bindings
    # before any qwen_fused module can run, and `bindings.require()` above refuses to fuse without it
    bindings.bind(model)
    return model


def unfuse_qkv(model_or_pipeline):
    """Exact inverse of `fuse_qkv`: restores the stock projections and the stock processor of each fused one."""
    model, family = transformer_and_family(model_or_pipeline)
    if not is_fused(model):
        raise ValueError("this transformer is not fused; nothing to unfuse")
    attns = family.attentions(model)
    for name, attn in attns:
        peft = _peft_layers(attn, list(family.STREAMS))
        if peft:
            raise ValueError(f"{name}.{peft[0]} carries a peft adapter; save it with qwen_fused.save_lora and "
                             f"unload it (transformer.unload_lora()) before unfusing")
    stock_of = {f: s for s, f in family.processors().items()}
    for _, attn in attns:
        fused = attn.processor
        for merged_name, names in family.STREAMS.items():
            parts = dict(zip(names, _split_linear(getattr(attn, merged_name), len(names))))
            _set_modules(attn, drop={merged_name}, add={n: parts[n] for n in family.STOCK_ORDER[merged_name]},
                         anchor=merged_name)
        proc = stock_of.get(type(fused), family.default_stock_processor())()
        proc._attention_backend = getattr(fused, "_attention_backend", None)
        proc._parallel_config = getattr(fused, "_parallel_config", None)
        attn.set_processor(proc)
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(model, _HOOK_ATTR)
    bindings.unbind(model)
    return model
