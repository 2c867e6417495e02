"""The LoRA that `qwen-fused train` trains: its target names, the frozen (fused, fp8, --lora_fused) base it sits on,
and the peft adapter itself."""
from __future__ import annotations

from .names import STREAMS

DEFAULT_TARGETS = "to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"
DEAD_IN_LAST_BLOCK = ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def stock_targets(targets):
    """Merged target names -> the stock model's q/k/v names (for --no_fuse runs)."""
    out = []
    for name in targets:
        leaf = name.rsplit(".", 1)[-1]
        out += [name[: len(name) - len(leaf)] + p for p in STREAMS[leaf]] if leaf in STREAMS else [name]
    return out


def lora_targets(spec: str) -> list[str]:
    """`--lora_target_modules` as a list. Names mean what they mean to peft on the stock model: to_q/to_k/to_v
    (add_*_proj) are three LoRAs, trained on the fused model as one block-diagonal LoRA over to_qkv
    (`qwen_fused.add_lora`, the same model as stock peft); to_qkv/add_qkv_proj is one LoRA over the merged
    projection (one A shared by q, k and v)."""
    names = []
    for name in (s.strip() for s in spec.split(",")):
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError("--lora_target_modules is empty")
    return names


def add_training_lora(transformer, rank, alpha, targets, init="gaussian"):
    """A peft adapter "default" on `targets` through `transformer.add_adapter`, which on a fused model takes
    merged names as they are and maps standard q/k/v names (see `lora_targets`)."""
    from peft import LoraConfig

    existing = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()}
    existing |= {std for merged, stds in STREAMS.items() if merged in existing for std in stds}
    missing = [t for t in targets if t.split(".")[0] not in existing]
    if missing:
        raise ValueError(f"LoRA target modules not in this transformer: {', '.join(missing)}")
    # the last block's text output is discarded by the Qwen-Image transformer: LoRAs there would get no gradient
    # (and DDP would wait for one forever). Qwen-Image 2.1's single-stream blocks have no such modules.
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    modules = dict(transformer.named_modules())
    dead = [f"{last}.{n}" for n in DEAD_IN_LAST_BLOCK if f"{last}.{n}" in modules]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                       init_lora_weights=init, target_modules=targets, exclude_modules=dead or None))
    return transformer


def enable_fp8_base(transformer, compute_dtype):
    """Frozen linear weights stored as float8_e4m3fn, upcast to `compute_dtype` around each use: diffusers'
    `enable_layerwise_casting`, as on a stock model (the fused processor runs hooked projections through
    their own forward, so the casting hooks apply to to_qkv / add_qkv_proj as to any Linear)."""
    import torch

    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    return transformer


def prepare_transformer(pipe, args, targets, fused_loras=(), weight_dtype=None):
    """Freeze, fuse (unless --no_fuse), merge --lora_fused LoRAs into the base, fp8 storage, add the LoRA
    (`weight_dtype`: the compute dtype of an fp8 base; default float32)."""
    import torch  # not at import: `qwen-fused train --help` reads DEFAULT_TARGETS from here
    from diffusers.training_utils import cast_training_params

    from .fuse import fuse_qkv

    transformer = pipe.transformer
    for module in (transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    if not args.no_fuse:
        fuse_qkv(transformer)
    if fused_loras:
        from .lora import load_lora

        for path, scale in fused_loras:
            load_lora(transformer, path, scale=scale, fuse=True)
    add_training_lora(transformer, args.lora_rank, args.lora_alpha,
                      stock_targets(targets) if args.no_fuse else targets)
    cast_training_params(transformer, dtype=torch.float32)  # the LoRA trains in fp32 under any base dtype
    if args.fp8_base:  # after the adapter: diffusers then leaves the LoRA layers out of the fp8 storage
        enable_fp8_base(transformer, weight_dtype or torch.float32)
    return transformer
