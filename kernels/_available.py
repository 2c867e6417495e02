"""Whether the Triton kernels can serve a call at all: the checks every op's `triton_problem` starts with.

Each op adds its own (head_dim for the QKV op, dtype agreement for the block ops and the SwiGLU). Triton is
imported here lazily, so the package runs its torch paths without triton installed.
"""
from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels compute in


def triton_problem(device_type: str, dtype: torch.dtype) -> str | None:
    """Why no Triton kernel can serve a call on `device_type` in `dtype`, or None."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported by the Triton kernels (float32, float16, bfloat16)"
    if device_type not in ("cuda", "cpu"):
        return f"device {device_type} is not supported by the Triton kernels (cuda, or cpu under TRITON_INTERPRET=1)"
    try:
        from . import _triton_launch
    except ImportError as e:  # triton not installed
        return f"triton is not importable ({e})"
    if device_type == "cpu" and not _triton_launch.INTERPRETED:
        return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 in the environment before triton "
                "is first imported")
    return None
