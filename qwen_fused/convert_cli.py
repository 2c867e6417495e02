"""`qwen-fused convert`: LoRA files and full transformer checkpoints between standard and merged q/k/v layout."""
from __future__ import annotations

import collections
import os
import sys

_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_unet_")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a LoRA or a transformer checkpoint between standard and merged QKV layout",
        description="Convert a LoRA file (any layout: diffusers, kohya/ComfyUI, DiffSynth, ai-toolkit, Lightning) "
                    "or a full transformer checkpoint (one .safetensors file, or a sharded folder / index.json) "
                    "between the standard (to_q/to_k/to_v) and merged (to_qkv/add_qkv_proj) layout. "
                    "Exact algebra; the kind of input and its layout are detected.")
    p.add_argument("--input", required=True, help="LoRA .safetensors, checkpoint .safetensors, folder or index.json")
    p.add_argument("--output", required=True, help="output file (or folder for a sharded checkpoint)")
    p.add_argument("--direction", required=True, choices=["to_merged", "to_standard"])
    p.add_argument("--format", choices=["diffusers", "kohya"], default=None,
                   help="LoRA output layout (default diffusers; kohya for ComfyUI); LoRA files only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)
    return p


def is_lora_file(path) -> bool:
    """True when the input (a .safetensors file, or a folder holding one) has LoRA keys; False for a checkpoint."""
    from safetensors import safe_open

    from .checkpoint import checkpoint_files

    kind, files, _ = checkpoint_files(path)
    if kind != "file":
        return False
    try:
        with safe_open(files[0], framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise ValueError(f"{files[0]} is not a readable safetensors file: {e}") from e
    return any(m in k for k in keys for m in _LORA_MARKERS) or any(k.endswith(".alpha") for k in keys)


def _ranks(modules):
    counts = collections.Counter(f.rank for f in modules.values())
    return ", ".join(f"rank {r} x{n}" for r, n in sorted(counts.items()))


def check_qwen_image_modules(modules):
    """The check `edit` / `load_lora` make on a model, without one: every LoRA module must be a Linear of a
    Qwen-Image transformer (a Flux LoRA shares the attention names, not the rest). Names only: the width is not
    known without the model (tiny and full-size transformers have the same names)."""
    import re

    import torch
    from diffusers import QwenImageTransformer2DModel

    from .names import STREAMS

    with torch.device("meta"):  # one block: every block has the same module names
        model = QwenImageTransformer2DModel(num_layers=1, num_attention_heads=1, attention_head_dim=16,
                                            joint_attention_dim=16, in_channels=16, axes_dims_rope=(4, 6, 6))
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names |= {f"transformer_blocks.0.attn.{leaf}" for merged, parts in STREAMS.items() for leaf in (merged, *parts)}
    foreign = [m for m in modules if re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.0.", m) not in names]
    if foreign:
        shown = ", ".join(sorted(foreign)[:4]) + (", ..." if len(foreign) > 4 else "")
        raise ValueError(f"this LoRA is not for Qwen-Image: {len(foreign)} of its {len(modules)} modules are not in a "
                         f"Qwen-Image transformer ({shown})")


def convert_lora_file(input_path, output_path, direction, fmt=None, overwrite=False, out=print):
    from .lora import convert, parse_lora, read_lora, write_lora

    if fmt == "kohya" and direction == "to_merged":
        raise ValueError("--format kohya is the layout of ComfyUI and kohya's tools, which have no to_qkv module: a "
                         "merged kohya file would load nowhere. Use --direction to_standard --format kohya")
    if os.path.exists(output_path) and not overwrite:
        raise FileExistsError(f"{output_path} exists; pass --overwrite to replace it")
    state_dict, metadata = read_lora(input_path)
    parsed = parse_lora(state_dict, metadata)
    check_qwen_image_modules(parsed.modules)
    converted = convert(parsed.modules, direction.removeprefix("to_"))
    layout = fmt or "diffusers"
    meta = write_lora(converted, output_path, layout=layout, overwrite=overwrite)
    out(f"LoRA: {parsed.layout} layout, {parsed.form} q/k/v, {len(state_dict)} tensors, {len(parsed.modules)} "
        f"modules ({_ranks(parsed.modules)})")
    out(f"  -> {layout} layout, {meta['form']} q/k/v, {len(converted)} modules ({_ranks(converted)})")
    out(f"wrote {output_path}")
    if meta["form"] == "merged":  # stock diffusers would load it without a word and without its q/k/v part
        out("  (merged layout: for qwen_fused.load_lora / qwen-fused edit only; give stock diffusers and ComfyUI "
            "the standard layout)")
    return meta


def run(args) -> int:
    from .checkpoint import convert_checkpoint

    try:
        if is_lora_file(args.input):
            convert_lora_file(args.input, args.output, args.direction, args.format, args.overwrite)
            return 0
        if args.format is not None:
            raise ValueError("--format applies to LoRA files; this input is a full transformer checkpoint")
        s = convert_checkpoint(args.input, args.output, args.direction, overwrite=args.overwrite)
        print(f"checkpoint ({s['kind']}, {s['files']} file{'s' if s['files'] > 1 else ''}): "
              f"{'merged' if args.direction == 'to_merged' else 'split'} {s['groups']} q/k/v groups, "
              f"{s['tensors_in']} tensors -> {s['tensors_out']}")
        print(f"wrote {s['output']}")
        return 0
    except (ValueError, OSError) as e:  # OSError: a missing or read-only output folder, an unreadable input
        print(f"qwen-fused convert: error: {e}", file=sys.stderr)
        return 2
