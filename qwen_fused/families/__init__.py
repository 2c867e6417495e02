"""Transformer families: what is specific to each model qwen_fused converts, in one module per family.

Shared code (`fuse.py` today; the LoRA layer, checkpoints, check and bench as they grow) asks the family of a
model instead of naming diffusers classes. A family module defines:

    NAME                 short name ("qwenimage", "qwenimage21")
    model_class()        the diffusers transformer class (imported on call: diffusers is slow to import), or None
                         when the installed diffusers does not have it
    STREAMS              merged projection -> its stock parts in row order, `to_qkv.weight = cat(parts)`
    STOCK_ORDER          merged projection -> the order the stock attention registers its parts in (unfusing
                         restores it, so that the state dict keeps its key order)
    NORMS                the attention's QK-norm attribute names the fused epilogue takes over
    attentions(model)    [(qualified name, attention module)] to merge, in block order
    processors()         {stock processor class: fused processor class}; fusing replaces each stock processor by
                         its fused counterpart, unfusing the other way round
    default_stock_processor()  what unfusing installs for a processor it does not know
    POS_EMBED_HOOK       a forward hook that fusing puts on `model.pos_embed` and unfusing removes: the RoPE
                         tables the fused processors read, converted once per forward
    LORA_TARGETS         the default LoRA target names on a fused model (the training default)
    meta_model()         a one-block transformer on the meta device (its module names: kohya keys map back by them)
    MERGED_LINEARS       (optional) opt-in merged projections beyond STREAMS, merged suffix -> (parts in row order,
                         stock order), e.g. 2.1's `img_mlp.gate_up`; the LoRA layer splits and merges them exactly
    LAYERS, HEADS, HEAD_DIM, WIDTH   the real model's size (for check and bench at real width)

A pipeline is found by its `.transformer`, for every family.
"""
from __future__ import annotations

from . import qwenimage, qwenimage21

FAMILIES = (qwenimage, qwenimage21)


def model_classes():
    """The diffusers classes of the families the installed diffusers has."""
    return tuple(c for c in (f.model_class() for f in FAMILIES) if c is not None)


def family_of(model):
    """The family module of a transformer instance, or None."""
    for family in FAMILIES:
        cls = family.model_class()
        if cls is not None and isinstance(model, cls):
            return family
    return None


def transformer_and_family(obj):
    """`(transformer, family)` for a transformer of a known family, or a pipeline holding one as `.transformer`."""
    family = family_of(obj)
    model = obj if family is not None else getattr(obj, "transformer", obj)
    family = family or family_of(model)
    if family is None:
        names = " or ".join(c.__name__ for c in model_classes())
        raise TypeError(
            f"qwen_fused works on diffusers' {names}, or a pipeline holding one as .transformer; got "
            f"{type(obj).__name__}" + (f" with .transformer {type(model).__name__}" if model is not obj else "")
        )
    return model, family
