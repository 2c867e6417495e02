"""Which implementation runs `fused_qkv` / `joint_qkv`: the Triton kernels or the pure-torch path.

    QWEN_FUSED_BACKEND = auto | triton | torch      (environment, read at call time)
    qwen_fused.kernels.set_backend(name)            (Python setting; overrides the environment; None clears it)

- `auto` (default): Triton on CUDA tensors the kernels serve; the torch path elsewhere. A CUDA call the
  kernels cannot serve (triton missing, head_dim not a power of two, ...) runs the torch path after a one-time
  warning.
- `triton`: always the kernels; anything they cannot compute raises `BackendError` (never a silent fallback).
  On CPU the kernels run under Triton's interpreter, which needs `TRITON_INTERPRET=1` in the environment
  before triton is first imported.
- `torch`: always the pure-torch path (plain autograd, no custom op).

Triton is imported lazily, so the package imports and runs its torch path without triton installed.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
ENV = "QWEN_FUSED_BACKEND"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_setting: str | None = None
_warned: set[str] = set()


class BackendError(RuntimeError):
    """The `triton` backend was asked for something the kernels cannot compute."""


def _check(name, source):
    if name not in BACKENDS:
        raise ValueError(f"unknown qwen_fused backend {name!r} (from {source}); choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Set the backend for this process (`auto`, `triton`, `torch`); `None` returns to the environment."""
    global _setting
    _setting = None if name is None else _check(name, "set_backend")


def get_backend() -> str:
    """The backend in force: the `set_backend` value, else `QWEN_FUSED_BACKEND`, else `auto`."""
    if _setting is not None:
        return _setting
    return _check(os.environ.get(ENV, "auto").strip().lower() or "auto", f"${ENV}")


def triton_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the Triton kernels cannot serve this call, or None when they can."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported by the Triton kernels (float32, float16, bfloat16)"
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two in [16, 256]"
    if device.type not in ("cuda", "cpu"):
        return f"device {device} is not supported by the Triton kernels (cuda, or cpu under TRITON_INTERPRET=1)"
    try:
        from . import _triton_qkv
    except ImportError as e:  # triton not installed
        return f"triton is not importable ({e})"
    if device.type == "cpu" and not _triton_qkv.INTERPRETED:
        return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 in the environment before triton "
                "is first imported")
    return None


def use_triton(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Route one call: True for the Triton kernels, False for the torch path; raises under `triton`."""
    backend = get_backend()
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False
    problem = triton_problem(device, dtype, head_dim)
    if problem is None:
        return True
    if backend == "triton":
        raise BackendError(f"QWEN_FUSED_BACKEND=triton cannot run this call: {problem}")
    if problem not in _warned:
        _warned.add(problem)
        warnings.warn(f"qwen_fused: using the torch path because {problem}", RuntimeWarning, stacklevel=3)
    return False
