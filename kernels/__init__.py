"""Triton kernels and their pure-torch references. Knows tensors only (no diffusers, no peft).

Installed as `qwen_fused.kernels`; never imported as a top-level `kernels` module. The backend
(`QWEN_FUSED_BACKEND` = auto | triton | torch | triton-fused | triton-gemm, or `set_backend`) picks the Triton
kernels or the torch path; see `backend.py`. The Triton route has two forwards, `fused` and `gemm` (cuBLAS + an
epilogue kernel), picked per call from measured per-GPU tables in `tuning/` (`dispatch.py`, written by
`python -m qwen_fused.kernels.tune`). The block ops (`linear_gelu`, `linear_gate_residual`,
`modulated_layernorm`, used by `qwen_fused.fuse_blocks`) follow the same pattern in `block_ops.py`,
`_torch_block.py` and `_triton_block.py`. Imports run one way: the contracts (`fused_qkv.py`, `block_ops.py`) use
their implementations, `dispatch.py` and `backend.py`; the Triton modules share `_triton_launch.py`;
`backend.py` (the setting) imports none of them.
"""
if __name__ == "qwen_fused.kernels":
    from ._torch_qkv import fused_qkv_torch, qkv_epilogue
    from .backend import BackendError, get_backend, set_backend
    from .block_ops import linear_gate_residual, linear_gelu, modulated_layernorm
    from .fused_qkv import fused_qkv, joint_qkv, rope_tables
else:
    # Imported as a top-level `kernels`: the repo root is on sys.path (`python -m pytest` run there) and
    # transformers imports `kernels` for Hugging Face's package of that name (transformers >= 5.25 requires it and
    # imports names from it). Stand aside: hand back Hugging Face's package when it is installed, else the installed
    # `qwen_fused.kernels` (importing our modules a second time would register the torch ops twice, the second copy
    # winning with its own backend setting), else stay an empty module.
    import importlib as _importlib
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
    else:
        try:
            _sys.modules[__name__] = _importlib.import_module("qwen_fused.kernels")
        except ImportError:
            pass

__all__ = ["fused_qkv", "fused_qkv_torch", "joint_qkv", "qkv_epilogue", "rope_tables", "set_backend", "get_backend",
           "BackendError", "linear_gelu", "linear_gate_residual", "modulated_layernorm"]
