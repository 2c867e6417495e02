"""The backend setting: which implementation runs `fused_qkv` / `joint_qkv`, the Triton kernels or the torch path.

    QWEN_FUSED_BACKEND = auto | triton | torch | triton-fused | triton-gemm     (environment, read at call time)
    qwen_fused.kernels.set_backend(name)            (Python setting; overrides the environment; None clears it)

- `auto` (default): Triton on CUDA tensors the kernels serve; the torch path elsewhere. A CUDA call the
  kernels cannot serve (triton missing, head_dim not a power of two, ...) runs the torch path after a one-time
  warning.
- `triton`: always the kernels; anything they cannot compute raises `BackendError` (never a silent fallback).
  On CPU the kernels run under Triton's interpreter, which needs `TRITON_INTERPRET=1` in the environment
  before triton is first imported.
- `torch`: always the pure-torch path (plain autograd, no custom op).
- `triton-fused`, `triton-gemm`: as `triton`, with the forward forced to one implementation: `fused` (one kernel
  for GEMM, LoRA and epilogue) or `gemm` (cuBLAS GEMMs, then an epilogue kernel). Under `auto` and `triton` the
  per-GPU table of measured choices picks one per call (dispatch.py).

This module is the bottom of `kernels/` and knows nothing of the kernels: the op modules (`fused_qkv.py`,
`block_ops.py`, `swiglu.py`) route each call by this setting and by what the kernels can serve (`use_triton`,
`_available.py`). Triton is imported lazily there, so the package imports and runs
its torch path without triton installed.
"""
from __future__ import annotations

import os
import warnings

BACKENDS = ("auto", "triton", "torch", "triton-fused", "triton-gemm")
IMPLS = ("fused", "gemm")  # the forward implementations of the Triton route
ENV = "QWEN_FUSED_BACKEND"

_setting: str | None = None


class BackendError(RuntimeError):
    """The `triton` backend was asked for something the kernels cannot compute."""


def _check(name, source):
    if name not in BACKENDS:
        raise ValueError(f"unknown qwen_fused backend {name!r} (from {source}); choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Set the backend for this process (one of BACKENDS); `None` returns to the environment."""
    global _setting
    _setting = None if name is None else _check(name, "set_backend")


def get_backend() -> str:
    """The backend in force: the `set_backend` value, else `QWEN_FUSED_BACKEND`, else `auto`."""
    if _setting is not None:
        return _setting
    return _check(os.environ.get(ENV, "auto").strip().lower() or "auto", f"${ENV}")


def forced_impl(backend: str) -> str | None:
    """The forward implementation a backend value forces (`triton-gemm` -> `gemm`), or None (the table decides)."""
    return backend[len("triton-"):] if backend.startswith("triton-") else None


_warned: set[str] = set()


def use_triton(device_type: str, problem) -> bool:
    """Whether a call on `device_type` runs the Triton kernels (True) or the torch path (False), by the setting.

    `problem()` says why the kernels cannot serve the call (None: they can); it is asked only when the setting
    wants the kernels. Under a `triton*` setting a problem raises `BackendError`; under `auto` the torch path runs,
    with one warning per reason."""
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and device_type != "cuda"):
        return False
    why = problem()
    if why is None:
        return True
    if backend != "auto":
        raise BackendError(f"QWEN_FUSED_BACKEND={backend} cannot run this call: {why}")
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"qwen_fused: using the torch path because {why}", RuntimeWarning, stacklevel=4)
    return False


def debug_nan() -> bool:
    """QWEN_FUSED_DEBUG_NAN=1 (a test switch): kernel outputs are NaN-filled before the kernels write them, so an
    element no kernel wrote shows."""
    return os.environ.get("QWEN_FUSED_DEBUG_NAN", "") == "1"
