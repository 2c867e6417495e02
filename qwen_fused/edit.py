"""`qwen-fused edit`: image editing with diffusers' Qwen-Image-Edit pipelines (and `QwenImage21Pipeline`, with
condition images or, without --image, from text alone), fused attention on by default."""
from __future__ import annotations

import argparse
import os

from .atomic import atomic_output
from .cli_util import resolve_device
from .demo import edit_demo_args


def add_parser(subparsers):
    from .cli_util import HelpFormatter

    p = subparsers.add_parser("edit", help="edit an image with Qwen-Image-Edit (fused attention by default)",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="diffusers folder or hub id of Qwen-Image-Edit, -2509, -2511 or Qwen-Image 2.1 "
                                   "(found from its model_index.json)")
    p.add_argument("--image", action="append", default=[],
                   help="condition image; repeat for -2509/-2511/2.1 (2.1 without one: text-to-image)")
    p.add_argument("--prompt", help="what to change")
    p.add_argument("--negative_prompt", default=None, help="what to steer away from (turns on true CFG)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA in any layout qwen_fused.load_lora reads; repeatable")
    p.add_argument("--fuse_lora", action="store_true", help="merge the LoRAs into the base weights (faster)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--true_cfg_scale", type=float, default=None,
                   help="true classifier-free guidance scale, used with --negative_prompt (default there: the "
                        "pipeline's, 4.0); without one there is no true CFG")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--height", type=int, default=None,
                   help="output height (default: from the last --image and --area; 2.1 without --image: a square of "
                        "--area, 1024 x 1024 without it)")
    p.add_argument("--width", type=int, default=None,
                   help="output width (default: from the last --image and --area; 2.1 without --image: a square of "
                        "--area, 1024 x 1024 without it)")
    p.add_argument("--area", type=int, default=None,
                   help="pixel area condition images are resized to for the VAE (stock: diffusers' VAE_IMAGE_SIZE, "
                        "1024 * 1024; Qwen-Image 2.1: output_resolution ** 2, for the text encoder too)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default=None,
                   help="image path; its extension sets the format (.png, .jpg, .webp, ...). Default: edit.png; with "
                        "--demo <temp>/qwen-fused-demo-edit.png, replaced by each demo")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no_fuse", dest="fuse", action="store_false", help="stock diffusers attention")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (diffusers' compile_repeated_blocks; the first denoising "
                        "step includes the compile time). Default: on with CUDA, off on a CPU")
    p.add_argument("--demo", action="store_true", help="tiny random offline pipeline and a synthetic image")
    p.add_argument("--demo_variant", default="edit", choices=["edit", "2509", "2511", "2.1"],
                   help="the --demo model: Qwen-Image-Edit, -2509, -2511 or Qwen-Image 2.1")
    p.set_defaults(func=run)
    return p


def image_format(path) -> str:
    """The image format PIL writes for `path`'s extension (a .jpg gets JPEG bytes, not PNG ones)."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    formats = Image.registered_extensions()
    if ext not in formats or formats[ext] not in Image.SAVE:
        raise ValueError(f"--output {path}: no image format for the extension {ext or '(none)'!r}; use .png, .jpg "
                         f"or .webp")
    return formats[ext]


NEEDS_IMAGE = ("at least one --image is required (Qwen-Image-Edit edits an image; only Qwen-Image 2.1 generates "
               "from text alone)")


def _check_args(args):
    """Every input checked before any model is loaded (whether --image may be left out: from the model's
    model_index.json here, or in `run` once the model is loaded where that file is not at hand yet)."""
    from .pipeline import check_lora_path, needs_condition_image, parse_lora_spec  # not at import: --help, no torch
    from .data import open_rgb

    if not args.model:
        raise ValueError("--model is required (or use --demo)")
    # from model_index.json where it is at hand (else once loaded): an unsupported pipeline raises here
    if needs_condition_image(args.model) and not args.image:
        raise ValueError(NEEDS_IMAGE)
    if not args.prompt or not args.prompt.strip():
        raise ValueError("--prompt is empty")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    images = [open_rgb(p, "--image") for p in args.image]
    loras = [parse_lora_spec(s) for s in args.lora]
    for path, _ in loras:
        check_lora_path(path, "--lora")
    image_format(args.output)
    if os.path.exists(args.output) and not args.overwrite:
        raise FileExistsError(f"--output {args.output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write --output {args.output}: {folder} is not a writable folder")
    return images, loras


def run(args) -> int:
    import sys

    import torch

    from .pipeline import call_pipeline, compile_blocks, edit_variant, load_pipeline

    if args.demo:
        edit_demo_args(args)
    args.output = args.output or "edit.png"
    try:
        device = resolve_device(args.device)
        images, loras = _check_args(args)
    except (ValueError, OSError) as e:
        print(f"qwen-fused edit: error: {e}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    try:
        pipe = load_pipeline(args.model, dtype=dtype)
        variant = edit_variant(pipe)
        if not images and variant != "2.1":  # whether one is needed is the model's to say: known once loaded
            raise ValueError(NEEDS_IMAGE)
        if variant == "edit" and len(images) > 1:
            raise ValueError("Qwen-Image-Edit takes one --image; -2509/-2511 take several")
        if args.fuse:
            from .fuse import fuse_qkv

            fuse_qkv(pipe)
        if loras:
            from .lora import load_lora

            names = []
            for i, (path, scale) in enumerate(loras):
                load_lora(pipe.transformer, path, adapter_name=f"lora{i}", scale=scale, fuse=args.fuse_lora)
                names.append(f"lora{i}")
    except (ValueError, OSError) as e:
        print(f"qwen-fused edit: error: {e}", file=sys.stderr)
        return 2
    pipe.to(device)
    compile_blocks(pipe.transformer, args.compile, device)
    pipe.set_progress_bar_config(disable=False)
    # true CFG needs a negative prompt; without one the pipeline's default scale (4.0) would only make it warn
    scale = args.true_cfg_scale if args.true_cfg_scale is not None or args.negative_prompt is not None else 1.0
    cfg = {} if scale is None else {"true_cfg_scale": scale}
    # 2.1 without --image: `image=None`, the pipeline's text-to-image path
    image = images[0] if variant == "edit" else images or None
    out = call_pipeline(pipe, area=args.area, image=image, prompt=args.prompt,
                        negative_prompt=args.negative_prompt, num_inference_steps=args.steps, **cfg,
                        height=args.height, width=args.width,
                        generator=torch.Generator(device="cpu").manual_seed(args.seed)).images[0]
    with atomic_output(args.output, overwrite=True) as tmp:  # --overwrite was checked before the run
        out.save(tmp, format=image_format(args.output))
    print(f"wrote {args.output} ({out.size[0]}x{out.size[1]}, {'fused' if args.fuse else 'stock'} attention)")
    return 0
