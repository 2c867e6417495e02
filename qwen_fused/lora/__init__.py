"""LoRA for Qwen-Image in every layout people have: detection, exact merged<->standard conversion, load, save.

The modules, bottom up (each imports only those above it in this list, and the layers below the LoRA layer):
  algebra        LoraFactors, exact standard <-> merged q/k/v conversion, LoraConfig ranks and scales
  formats        layouts, key parsing and detection, reading and writing LoRA files and state dicts
  adapters       peft adapters on a (fused or stock) model: load_lora, add_lora, lora_from_model, save_lora
  diffusers_api  diffusers' LoRA API on a fused model, and the binding every fused model gets
"""
from .adapters import add_lora, load_lora, lora_from_model, peft_adapter, save_lora
from .algebra import (LoraFactors, apply_config, block_columns, config_kwargs, convert, rank_and_scale, to_merged,
                      to_standard)
from .diffusers_api import (bind_lora_api, fused_load_lora_adapter, fused_save_lora_adapter, standard_lora_layers,
                            unbind_lora_api, wrap_pipeline_lora_saving)
from .formats import (LAYOUTS, ParsedLora, convert_lora, detect_lora_layout, parse_lora, read_lora, write_lora,
                      write_safetensors)

__all__ = [
    # the public API (qwen_fused.load_lora, ...)
    "load_lora", "convert_lora", "save_lora", "add_lora", "read_lora", "detect_lora_layout", "parse_lora",
    "lora_from_model", "write_lora", "write_safetensors",
    # the building blocks, for the layers above (train, convert) and for tests
    "LAYOUTS", "LoraFactors", "ParsedLora", "apply_config", "block_columns", "config_kwargs", "convert",
    "rank_and_scale", "to_merged", "to_standard", "peft_adapter", "standard_lora_layers",
    "fused_load_lora_adapter", "fused_save_lora_adapter", "wrap_pipeline_lora_saving", "bind_lora_api",
    "unbind_lora_api",
]
