"""Triton kernels and their pure-torch references. Knows tensors only (no diffusers, no peft).

Installed as `qwen_fused.kernels`; never imported as a top-level `kernels` module.
"""
from .fused_qkv import fused_qkv, fused_qkv_torch, joint_qkv, rope_tables

__all__ = ["fused_qkv", "fused_qkv_torch", "joint_qkv", "rope_tables"]
