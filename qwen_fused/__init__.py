"""qwen-fused: merged-QKV Qwen-Image transformer with fused kernels and the same results as diffusers.

The public names load on first use (PEP 562), so that `import qwen_fused.kernels` stays tensor-only: the
kernels must not pay for importing diffusers (seconds) when they are used on their own.
"""
import importlib

from . import bindings

__version__ = "0.1.0"
_EXPORTS = {
    "fuse_qkv": "fuse", "unfuse_qkv": "fuse", "is_fused": "fuse",
    "FusedQwenAttnProcessor": "processor",
    "fuse_blocks": "block", "unfuse_blocks": "block", "is_blocks_fused": "block",
    "FusedQwenImage21AttnProcessor": "families.qwenimage21_processor",
    "FusedQwenImage21FlexAttnProcessor": "families.qwenimage21_processor",
    "fuse_swiglu": "families.qwenimage21_mlp", "unfuse_swiglu": "families.qwenimage21_mlp",
    "is_swiglu_fused": "families.qwenimage21_mlp",
    "load_lora": "lora", "convert_lora": "lora", "save_lora": "lora", "add_lora": "lora",
}
__all__ = list(_EXPORTS)


def _bind_lora_api(model):
    from .lora.diffusers_api import bind_lora_api

    bind_lora_api(model)


def _unbind_lora_api(model):
    from .lora.diffusers_api import unbind_lora_api

    unbind_lora_api(model)


# Every fused model gets diffusers' LoRA API rebound for the merged layout, however it was fused: fuse.py sits below
# the LoRA layer and cannot import it, so this root (which Python runs before any qwen_fused module) registers the
# LoRA layer's binder with fuse_qkv and fuse_swiglu; the LoRA layer itself is imported only when a model is fused
# (bindings.py)
bindings.register("lora", _bind_lora_api, _unbind_lora_api)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen_fused' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
