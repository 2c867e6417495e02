"""What the layers above fuse.py put on every fused model's instance: the one registration point between them.

A fused model must always carry diffusers' LoRA API rebound for the merged layout (`add_adapter`,
`load_lora_adapter`, `save_lora_adapter`, from `qwen_fused.lora.diffusers_api`): without it diffusers' loaders
find no `to_q` on the model and silently drop the q/k/v parts of a LoRA. That code is the LoRA layer, which sits
above fuse.py, and fuse.py must not import it (not even lazily). So the dependency is inverted here:

- the package root, `qwen_fused/__init__.py`, registers the LoRA layer's binder in this module when it runs.
  Python runs a package's `__init__` before any of its submodules, so whatever a caller imports (`qwen_fused`,
  `qwen_fused.fuse`, `qwen_fused.checkpoint`, ...), the binder is registered before `fuse_qkv` can run;
- `fuse.fuse_qkv` (and `families/qwenimage21_mlp.fuse_swiglu`: on its merged MLP diffusers' loaders would drop
  `gate_layer`/`proj` LoRAs alike) refuses to fuse while nothing is registered (so no path can give a fused model
  without the binding), and runs every binder on the model it fused; `fuse.unfuse_qkv` and `unfuse_swiglu` run
  their unbinders (the LoRA layer's keeps the binding while the model still holds the other merge).

The root's binder imports the LoRA layer only when a model is fused, so `import qwen_fused.kernels` stays light.
This module imports nothing: it sits at the bottom, with names.py and atomic.py.
"""
from __future__ import annotations

_BINDERS = {}  # name -> (bind(model), unbind(model))


def register(name, bind, unbind):
    """Run `bind(model)` on every model `fuse_qkv` / `fuse_swiglu` fuses, and `unbind(model)` when `unfuse_qkv` /
    `unfuse_swiglu` restores it. Registering a name again replaces its functions."""
    _BINDERS[name] = (bind, unbind)


def require():
    """Raise unless a binder is registered (fuse_qkv and fuse_swiglu call this before they change anything)."""
    if not _BINDERS:
        raise RuntimeError("qwen_fused: no LoRA API binder is registered, so a fused model would silently drop "
                           "LoRAs on its merged parts (q/k/v, gate_layer/proj) in diffusers' loaders; import "
                           "qwen_fused normally (its __init__ registers it)")


def bind(model):
    for bind_one, _ in _BINDERS.values():
        bind_one(model)


def unbind(model):
    for _, unbind_one in _BINDERS.values():
        unbind_one(model)
