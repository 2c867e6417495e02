"""Convert a diffusers Qwen-Image transformer to the merged-QKV layout in place, and back."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from . import bindings
from .names import STOCK_ORDER, STREAMS
from .processor import FusedQwenAttnProcessor, pos_embed_hook

_HOOK_ATTR = "_qwen_fused_rope_hook"


def transformer_of(obj):
    """The QwenImageTransformer2DModel inside `obj` (a transformer, or a pipeline holding one)."""
    from diffusers import QwenImageTransformer2DModel

    model = getattr(obj, "transformer", obj) if not isinstance(obj, QwenImageTransformer2DModel) else obj
    if not isinstance(model, QwenImageTransformer2DModel):
        raise TypeError(
            f"qwen_fused works on diffusers' QwenImageTransformer2DModel or a pipeline holding one as "
            f".transformer; got {type(obj).__name__}"
            + (f" with .transformer {type(model).__name__}" if model is not obj else "")
        )
    return model


def _attentions(model):
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(model.transformer_blocks)]


def is_fused(model_or_pipeline) -> bool:
    """True when every block of the transformer carries merged `to_qkv` / `add_qkv_proj` projections."""
    model = transformer_of(model_or_pipeline)
    return all(hasattr(attn, "to_qkv") for _, attn in _attentions(model)) and len(model.transformer_blocks) > 0


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


def _check_stock(name, attn):
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    if not isinstance(attn.processor, QwenDoubleStreamAttnProcessor2_0):
        raise TypeError(f"{name} uses processor {type(attn.processor).__name__}; fuse_qkv only replaces "
                        f"QwenDoubleStreamAttnProcessor2_0")
    missing = [n for names in STREAMS.values() for n in names if getattr(attn, n, None) is None]
    if missing:
        raise TypeError(f"{name} has no {', '.join(missing)}; not a Qwen-Image attention")
    peft = _peft_layers(attn, [n for names in STREAMS.values() for n in names])
    if peft:
        raise ValueError(
            f"{name}.{peft[0]} carries a peft LoRA adapter. Fuse the QKV projections first and load the LoRA "
            f"afterwards with qwen_fused.load_lora(transformer, path), or bake it into the base weights with "
            f"transformer.fuse_lora() and transformer.unload_lora() before calling fuse_qkv."
        )
    hooked = [n for names in STREAMS.values() for n in names
              if hasattr(getattr(attn, n), "_hf_hook") or hasattr(getattr(attn, n), "_diffusers_hook")]
    if hooked:
        # accelerate offload hooks and diffusers hooks (layerwise casting, group offloading) live on the modules
        # that fusing replaces: the merged projection would silently run without them
        raise ValueError(
            f"{name}.{hooked[0]} carries accelerate/diffusers hooks (CPU offload, layerwise casting or group "
            f"offloading). Call qwen_fused.fuse_qkv before enabling them."
        )
    norms = [attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k]
    if any(n is not None and (type(n) is not RMSNorm or n.weight is None) for n in norms):
        raise TypeError(f"{name}: fused epilogue supports RMSNorm (with weight) QK norms only")
    if len({n.eps for n in norms if n is not None}) > 1:
        raise ValueError(f"{name}: QK norms have different eps")


def fuse_qkv(model_or_pipeline):
    """Merge each block's q/k/v projections (both streams) into `to_qkv` / `add_qkv_proj`, in place.

    Works block by block and frees the old parameters as it goes, so peak memory grows by one block's
    projections, not by the model. Keeps device, dtype and requires_grad; works on meta-device models.
    Returns the transformer.
    """
    model = transformer_of(model_or_pipeline)
    if is_fused(model) or any(hasattr(attn, "to_qkv") for _, attn in _attentions(model)):
        raise ValueError("this transformer is already fused (its blocks have to_qkv); call unfuse_qkv first")
    attns = _attentions(model)
    if not attns:
        raise ValueError("transformer has no transformer_blocks to fuse")
    for name, attn in attns:  # validate everything before changing anything
        _check_stock(name, attn)
    bindings.require()
    for _, attn in attns:
        stock = attn.processor
        for merged_name, names in STREAMS.items():
            merged = _merged_linear([getattr(attn, n) for n in names])
            _set_modules(attn, drop=set(names), add={merged_name: merged}, anchor=STOCK_ORDER[merged_name][0])
        proc = FusedQwenAttnProcessor()
        proc._attention_backend = stock._attention_backend
        proc._parallel_config = stock._parallel_config
        attn.set_processor(proc)
    setattr(model, _HOOK_ATTR, model.pos_embed.register_forward_hook(pos_embed_hook))
    # diffusers' LoRA API, rebound for the merged layout on this instance. The LoRA layer provides it, and this
    # module sits below that layer and must not import it: the package root registers it in qwen_fused.bindings
    # before any qwen_fused module can run, and `bindings.require()` above refuses to fuse without it
    bindings.bind(model)
    return model


def unfuse_qkv(model_or_pipeline):
    """Exact inverse of `fuse_qkv`: restores `to_q/k/v`, `add_q/k/v_proj` and the stock processor."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    model = transformer_of(model_or_pipeline)
    if not is_fused(model):
        raise ValueError("this transformer is not fused; nothing to unfuse")
    attns = _attentions(model)
    for name, attn in attns:
        peft = _peft_layers(attn, list(STREAMS))
        if peft:
            raise ValueError(f"{name}.{peft[0]} carries a peft adapter; save it with qwen_fused.save_lora and "
                             f"unload it (transformer.unload_lora()) before unfusing")
    for _, attn in attns:
        fused = attn.processor
        for merged_name, names in STREAMS.items():
            parts = dict(zip(names, _split_linear(getattr(attn, merged_name), len(names))))
            _set_modules(attn, drop={merged_name}, add={n: parts[n] for n in STOCK_ORDER[merged_name]},
                         anchor=merged_name)
        proc = QwenDoubleStreamAttnProcessor2_0()
        proc._attention_backend = getattr(fused, "_attention_backend", None)
        proc._parallel_config = getattr(fused, "_parallel_config", None)
        attn.set_processor(proc)
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(model, _HOOK_ATTR)
    bindings.unbind(model)
    return model
