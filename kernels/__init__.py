"""Triton kernels and their pure-torch references. Knows tensors only (no diffusers, no peft).

Installed as `qwen_fused.kernels`; never imported as a top-level `kernels` module. The backend
(`QWEN_FUSED_BACKEND` = auto | triton | torch, or `set_backend`) picks the Triton kernels or the torch path;
see `backend.py`.
"""
from .backend import BackendError, get_backend, set_backend
from .fused_qkv import fused_qkv, fused_qkv_torch, joint_qkv, rope_tables

__all__ = ["fused_qkv", "fused_qkv_torch", "joint_qkv", "rope_tables", "set_backend", "get_backend",
           "BackendError"]
