"""`--demo` of `qwen-fused train` and `qwen-fused edit`: a tiny random Qwen-Image-Edit (or 2.1) pipeline and synthetic
images in a temp folder that goes when the process exits (the output the user asked for stays), so that either
command runs offline in seconds."""
from __future__ import annotations

import json
import os
import tempfile

from .cli_util import scratch_folder


def make_demo_dataset(folder, n=4, size=(64, 48), edits=1, seed=0):
    """Synthetic edit pairs: the edit image is random colour blocks, the target the same with red boosted."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        blocks = rng.rand(size[1] // 8, size[0] // 8, 3)
        src = np.kron(blocks, np.ones((8, 8, 1)))
        names = []
        for j in range(edits):
            Image.fromarray((np.roll(src, j * 8, axis=1) * 255).astype("uint8")).save(
                os.path.join(folder, "images", f"{i}_edit{j}.png"))
            names.append(f"images/{i}_edit{j}.png")
        tgt = src.copy()
        tgt[..., 0] = np.clip(tgt[..., 0] * 0.5 + 0.5, 0, 1)
        Image.fromarray((tgt * 255).astype("uint8")).save(os.path.join(folder, "images", f"{i}_target.png"))
        rows.append({"image": f"images/{i}_target.png", "edit_image": names if edits > 1 else names[0],
                     "prompt": "make it redder"})
    if edits > 1:
        path = os.path.join(folder, "metadata.json")
        with open(path, "w") as f:
            json.dump(rows, f)
    else:
        import csv

        path = os.path.join(folder, "metadata.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "edit_image", "prompt"])
            w.writeheader()
            w.writerows(rows)
    return path


def demo_output_dir() -> str:
    """`train --demo`'s default output: one fixed folder in the temp dir that each demo replaces (a new one per
    run would pile up), unless something there is not a demo's output: then a new folder."""
    path = os.path.join(tempfile.gettempdir(), "qwen-fused-demo-output")
    try:
        with open(os.path.join(path, "run.json")) as f:
            ours = json.load(f).get("demo") is True
    except (OSError, ValueError):
        ours = False
    if not os.path.exists(path) or ours:
        return path
    return tempfile.mkdtemp(prefix="qwen-fused-demo-output-")


def save_demo_pipeline(path, seed, variant):
    """The --demo model: a tiny Qwen-Image-Edit pipeline (`qwen_fused.tiny`) or, for "2.1", a tiny
    `QwenImage21Pipeline` (`qwen_fused.families.tiny21_pipeline`), saved to `path`."""
    if variant == "2.1":
        from .families.tiny21_pipeline import save_tiny_pipeline as save21

        return save21(path, seed=seed)
    from .tiny import save_tiny_pipeline

    return save_tiny_pipeline(path, seed=seed, variant=variant)


def train_demo_args(args):
    """Fill in a tiny offline training run: a saved tiny pipeline and synthetic data in a temp folder."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # under a multi-process launch the main process builds, the others use its folder; `cpu` as Accelerator
    # reads it, so that both see the same distributed set-up (torchrun on CPU: ACCELERATE_USE_CPU=1)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    # the tiny model and data only feed this run: they go when the main process exits; the output stays
    folders = [None, None]
    if state.is_main_process:
        folders = [scratch_folder("qwen-fused-demo-"), args.output_dir or demo_output_dir()]
    if state.num_processes > 1:
        broadcast_object_list(folders)
    work, output_dir = folders
    if not args.output_dir:  # the demo's own folder, which the next demo replaces
        args.output_dir, args.overwrite = output_dir, True
    model_path, data_path = os.path.join(work, "model"), os.path.join(work, "data")
    if state.is_main_process:
        if not args.pretrained_model_name_or_path:
            save_demo_pipeline(model_path, args.seed, args.demo_variant)
        if not args.dataset_metadata_path:
            make_demo_dataset(data_path, edits=1 if args.demo_variant == "edit" else 2)
    state.wait_for_everyone()
    args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or model_path
    if not args.dataset_metadata_path:
        args.dataset_base_path = data_path
        args.dataset_metadata_path = os.path.join(data_path, "metadata.csv" if args.demo_variant == "edit"
                                                  else "metadata.json")
    if args.max_train_steps is None:
        args.max_train_steps = 8
    if args.max_pixels == 1048576:
        args.max_pixels = 64 * 64
    if args.lora_rank == 32:
        args.lora_rank = 4
    if args.save_steps == 500:
        args.save_steps = 4
    if state.is_main_process:
        print(f"demo: tiny model and data in {work} (removed at exit); output in {args.output_dir}")
    return args


def edit_demo_args(args):
    """Fill in a tiny offline edit: a saved tiny pipeline and a random input image in a temp folder."""
    import numpy as np
    from PIL import Image

    work = scratch_folder("qwen-fused-edit-demo-")  # model and input image: gone at exit; the output stays
    args.model = args.model or os.path.join(work, "model")
    if not os.path.exists(args.model):
        save_demo_pipeline(args.model, args.seed, args.demo_variant)
    if not args.image:
        path = os.path.join(work, "input.png")
        Image.fromarray((np.random.RandomState(args.seed).rand(48, 64, 3) * 255).astype("uint8")).save(path)
        args.image = [path] * (1 if args.demo_variant == "edit" else 2)
    args.prompt = args.prompt or "make it red"
    if not args.output:  # one fixed file that each demo replaces (a new temp folder per run would pile up)
        args.output, args.overwrite = os.path.join(tempfile.gettempdir(), "qwen-fused-demo-edit.png"), True
    args.steps = 4 if args.steps == 50 else args.steps
    args.area = args.area or 64 * 64
    args.height, args.width = args.height or 32, args.width or 32
    print(f"demo: tiny model in {args.model}")
