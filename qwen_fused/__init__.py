"""qwen-fused: merged-QKV Qwen-Image transformer with fused kernels and the same results as diffusers."""
from .fuse import fuse_qkv, is_fused, unfuse_qkv
from .processor import FusedQwenAttnProcessor
from .lora import add_lora, convert_lora, load_lora, save_lora

__version__ = "0.1.0"
__all__ = ["fuse_qkv", "unfuse_qkv", "is_fused", "FusedQwenAttnProcessor", "load_lora", "convert_lora", "save_lora",
           "add_lora"]
