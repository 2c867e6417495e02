"""Encoding the training set once, before training: prompts (with any condition images) through the text encoder,
target and condition images through the VAE, at the sizes `data.plan_sample` plans; optionally kept in an
`EncodedCache` on disk. Afterwards the text encoder and the VAE can leave the GPU."""
from __future__ import annotations

import json
import os

import torch

from . import data as D
from .pipeline import edit_variant


@torch.no_grad()
def encode_sample(pipe, record: D.Record, plan: D.Plan, device) -> dict:
    variant = edit_variant(pipe)
    if variant == "2.1":  # the family's own encoding (condition images in the text stream, RGBA VAE inputs)
        from .families.qwenimage21_train import encode_sample as encode21

        return encode21(pipe, record, plan, device)
    ip = pipe.image_processor
    target_img = D.open_rgb(record.image, record.line)
    edit_imgs = [D.open_rgb(p, record.line) for p in record.edit_images]

    def latents(img, size):
        w, h = size
        pixels = ip.preprocess(img, h, w).unsqueeze(2).to(device, pipe.vae.dtype)
        return pipe._encode_vae_image(pixels, generator=None)[0].float().cpu()

    if variant == "edit":
        vl = ip.resize(edit_imgs[0], plan.edits[0][1], plan.edits[0][0])
    else:
        vl = [ip.resize(img, h, w) for img, (w, h) in zip(edit_imgs, plan.vl)]
    embeds, mask = pipe.encode_prompt(prompt=record.prompt, image=vl, device=device)
    embeds = embeds[0] if mask is None else embeds[0][mask[0].bool()]
    return {"prompt_embeds": embeds.float().cpu(), "target": latents(target_img, plan.target),
            "edits": [latents(img, size) for img, size in zip(edit_imgs, plan.edits)]}


ENCODER_FOLDERS = ("vae", "text_encoder", "tokenizer", "processor")  # what an encoded sample depends on


def model_key(args, pipe) -> str:
    """Part of every cache key: the pipeline class, dtypes and, for a local folder, the size and time of every
    encoder file (new weights saved into the same folder invalidate the cache; a hub id is taken as is)."""
    path = args.pretrained_model_name_or_path
    files = []
    if os.path.isdir(path):
        path = os.path.abspath(path)
        for sub in ENCODER_FOLDERS:
            for root, _, names in sorted(os.walk(os.path.join(path, sub))):
                files += [D.file_fingerprint(os.path.join(root, n)) for n in sorted(names)]
    cfg = {k: v for k, v in pipe.text_encoder.config.to_dict().items() if k in ("hidden_size", "vocab_size")}
    return json.dumps([path, type(pipe).__name__, str(pipe.vae.dtype), str(pipe.text_encoder.dtype), cfg, files],
                      sort_keys=True)


def cache_folder(args):
    """Where `--cache` keeps encoded samples (None: no cache)."""
    if args.cache is None:
        return None
    return args.cache or os.path.join(args.output_dir, "cache")


def build_dataset(args, pipe, accelerator, records):
    variant = edit_variant(pipe)
    D.check_conditions(records, text_to_image=variant == "2.1")  # the model's rule (`train` reads without it)
    if variant == "edit" and len(records[0].edit_images) != 1:
        raise D.DataError(f"Qwen-Image-Edit takes one edit image per sample; the metadata has "
                          f"{len(records[0].edit_images)} (use -2509/-2511 for several)")
    # Qwen-Image-Edit and 2.1 show the text encoder the VAE-sized condition images (no separate condition area)
    plans = [D.plan_sample(r, args.max_pixels, None if variant in ("edit", "2.1") else args.condition_area)
             for r in records]
    device = accelerator.device
    pipe.text_encoder.to(device)
    pipe.vae.to(device)
    if args.cache is not None:
        cache = D.EncodedCache(cache_folder(args))
        mkey = model_key(args, pipe)
        keys = [D.sample_key(r, p, mkey) for r, p in zip(records, plans)]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        # every process encodes its share of the missing samples, then all read the cache
        mine = todo[accelerator.process_index::accelerator.num_processes]
        for i in _progress(mine, accelerator, "encoding samples"):
            cache.save(keys[i], encode_sample(pipe, records[i], plans[i], device))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            print(f"cache {cache.folder}: {len(records) - len(todo)} samples reused, {len(todo)} encoded")
        items = keys
    else:
        cache = None
        # the bar is the loop itself: zip() would stop on `records` before the bar's last step (n-1 of n)
        items = [encode_sample(pipe, records[i], plans[i], device)
                 for i in _progress(range(len(records)), accelerator, "encoding samples")]
    pipe.text_encoder.to("cpu")
    pipe.vae.to("cpu")
    return D.EncodedDataset(items, [p.bucket for p in plans], repeat=args.dataset_repeat, cache=cache)


def _progress(items, accelerator, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not accelerator.is_local_main_process or len(items) < 2)
