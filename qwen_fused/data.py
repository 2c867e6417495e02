"""Training data: metadata files, image sizing, size buckets, and an on-disk cache of encoded samples.

Metadata (paths relative to `base_path`):
  CSV    columns `image, edit_image, prompt` (one edit image per row)
  JSON   a list of objects `{"image": ..., "edit_image": ... or [...], "prompt": ...}`
  JSONL  one such object per line
`image` is the target (the edited result), `edit_image` the condition image(s) (-2509/-2511 take several).
Qwen-Image 2.1 also trains text-to-image: a row without `edit_image` (CSV: no such column, or an empty cell;
JSON: no key, null or []) has no condition image, and one dataset may mix 0, 1 and 2 (`check_conditions`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass

import torch
from PIL import Image

from .atomic import atomic_output

REQUIRED = ("image", "edit_image", "prompt")  # what an edit model's rows hold; a text-to-image row lacks edit_image
MULTIPLE = 32  # VAE factor 8 x patch 2 x 2 (the pipelines snap sides to 16; 32 keeps latents even after packing)


class DataError(ValueError):
    """A problem with the dataset (file, column, image, prompt); raised before any compute starts."""


@dataclass(frozen=True)
class Record:
    image: str  # absolute path of the target image
    edit_images: tuple  # absolute paths of the condition images
    prompt: str
    line: str  # where it came from, for messages ("meta.csv row 3")


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) no larger than `max_pixels` in area (never upscaled), sides multiples of 32, aspect kept."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(MULTIPLE, int(width * scale) // MULTIPLE * MULTIPLE)
    h = max(MULTIPLE, int(height * scale) // MULTIPLE * MULTIPLE)
    return w, h


def area_size(width: int, height: int, area: int) -> tuple[int, int]:
    """The stock pipelines' `calculate_dimensions(area, w / h)`: (w, h) of about `area` pixels, sides of 32."""
    # imported on use: the pipeline module imports transformers
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    return calculate_dimensions(area, width / height)


def read_metadata(base_path, metadata_path, require_conditions: bool = True) -> list[Record]:
    """Parse and validate a metadata file: every referenced image must exist and every prompt be non-empty.
    `require_conditions`: also the edit models' rule (`check_conditions`); `train` reads with False, as the model
    that decides it is not loaded yet, and `encode.build_dataset` applies the model's rule."""
    base_path = os.fspath(base_path)
    metadata_path = os.fspath(metadata_path)
    if not os.path.isdir(base_path):
        raise DataError(f"dataset base path {base_path} does not exist or is not a folder")
    if os.path.isdir(metadata_path):
        raise DataError(f"metadata file {metadata_path} is a folder; pass the .csv, .json or .jsonl file")
    if not os.path.isfile(metadata_path):
        raise DataError(f"metadata file {metadata_path} does not exist")
    name = os.path.basename(metadata_path)
    try:
        with open(metadata_path, encoding="utf-8") as f:
            if metadata_path.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                need = REQUIRED if require_conditions else [c for c in REQUIRED if c != "edit_image"]
                missing = [c for c in need if c not in (reader.fieldnames or [])]
                if missing:
                    raise DataError(f"{name}: missing column(s) {', '.join(missing)} (has {reader.fieldnames}); "
                                    f"expected {', '.join(REQUIRED)}"
                                    f"{'' if require_conditions else ' (Qwen-Image 2.1: edit_image optional)'}")
                rows = [(f"{name} row {i + 2}", row) for i, row in enumerate(reader)]
            elif metadata_path.lower().endswith(".jsonl"):
                rows = [(f"{name} line {i + 1}", json.loads(line)) for i, line in enumerate(f) if line.strip()]
            elif metadata_path.lower().endswith(".json"):
                data = json.load(f)
                if not isinstance(data, list):
                    raise DataError(f"{name}: expected a JSON list of samples, got {type(data).__name__}")
                rows = [(f"{name} item {i}", row) for i, row in enumerate(data)]
            else:
                raise DataError(f"{name}: metadata must be .csv, .json or .jsonl")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"cannot read metadata file {metadata_path}: {e}") from e
    if not rows:
        raise DataError(f"{name} holds no samples")
    records = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with {', '.join(REQUIRED)}")
        needed = ("image", "edit_image") if require_conditions else ("image",)
        missing = [c for c in needed if row.get(c) in (None, "", [])]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: empty prompt")
        edits = row.get("edit_image")
        edits = [] if edits in (None, "") else edits if isinstance(edits, list) else [edits]
        paths = [os.path.join(base_path, p) for p in [row["image"], *edits]]
        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"{where}: image {p} does not exist")
        records.append(Record(paths[0], tuple(paths[1:]), prompt, where))
    if require_conditions:
        check_conditions(records, text_to_image=False)
    return records


def check_conditions(records: list[Record], text_to_image: bool):
    """The condition images a model can train on. An edit model (Qwen-Image-Edit, -2509, -2511) edits: every
    sample needs one, and all the same number. Qwen-Image 2.1 takes none (text-to-image) to several, mixed in
    one dataset: its batch is built per bucket (`Plan.bucket` holds the condition sizes, so the count too)."""
    if text_to_image:
        return
    for r in records:
        if not r.edit_images:
            raise DataError(f"{r.line}: missing edit_image (an edit model needs a condition image per sample; "
                            f"rows without one train text-to-image on Qwen-Image 2.1 only)")
    counts = {len(r.edit_images) for r in records}
    if len(counts) > 1:
        name = records[0].line.rsplit(" ", 2)[0]  # the metadata file's name ("meta.csv row 2")
        raise DataError(f"{name}: samples have different numbers of edit images ({sorted(counts)}); use one count")


def open_rgb(path, where="") -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise DataError(f"{where + ': ' if where else ''}cannot read image {path}: {e}") from e


def image_size(path, where="") -> tuple[int, int]:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except OSError as e:
        raise DataError(f"{where + ': ' if where else ''}cannot read image {path}: {e}") from e


@dataclass(frozen=True)
class Plan:
    """Sizes one sample is trained at: target, each condition image for the VAE and for the text encoder (no
    condition image: `edits` is empty, a text-to-image sample)."""
    target: tuple
    edits: tuple
    vl: tuple | None  # None: the text encoder sees the VAE-sized condition image (Qwen-Image-Edit)

    @property
    def bucket(self):
        return (self.target, self.edits)


def plan_sample(record: Record, max_pixels: int, condition_area: int | None) -> Plan:
    target = fit_size(*image_size(record.image, record.line), max_pixels)
    edit_sizes = [image_size(p, record.line) for p in record.edit_images]
    edits = tuple(fit_size(w, h, max_pixels) for w, h in edit_sizes)
    vl = None if condition_area is None else tuple(area_size(w, h, condition_area) for w, h in edit_sizes)
    return Plan(target, edits, vl)


def file_fingerprint(path) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def sample_key(record: Record, plan: Plan, model_key: str) -> str:
    """Changes whenever anything that goes into the encoded sample changes (files, prompt, sizes, model); the
    plan holds one size per condition image, so a text-to-image sample and an edit of the same target differ."""
    parts = [model_key, record.prompt, repr(plan), *(file_fingerprint(p) for p in [record.image, *record.edit_images])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class EncodedCache:
    """Encoded samples (text embeddings and VAE latents) as one safetensors file per sample under `folder`."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        if not os.access(self.folder, os.W_OK):
            raise DataError(f"cache folder {self.folder} is not writable")

    def path(self, key):
        return os.path.join(self.folder, f"{key}.safetensors")

    def __contains__(self, key):
        return os.path.isfile(self.path(key))

    def load(self, key) -> dict:
        from safetensors.torch import load_file

        return unflatten(load_file(self.path(key)))

    def save(self, key, sample: dict):
        from safetensors.torch import save_file

        with atomic_output(self.path(key), overwrite=True) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in flatten(sample).items()}, tmp)


def flatten(sample: dict) -> dict:
    out = {"prompt_embeds": sample["prompt_embeds"], "target": sample["target"]}
    if "img_mask" in sample:  # Qwen-Image 2.1: the condition-image slots of the text stream
        out["img_mask"] = sample["img_mask"]
    out.update({f"edit.{i}": e for i, e in enumerate(sample["edits"])})
    return out


def unflatten(tensors: dict) -> dict:
    n = sum(1 for k in tensors if k.startswith("edit."))
    out = {"prompt_embeds": tensors["prompt_embeds"], "target": tensors["target"],
           "edits": [tensors[f"edit.{i}"] for i in range(n)]}
    if "img_mask" in tensors:
        out["img_mask"] = tensors["img_mask"]
    return out


class EncodedDataset(torch.utils.data.Dataset):
    """Encoded samples, from memory or from an `EncodedCache` by key; `dataset_repeat` repeats the list."""

    def __init__(self, items, buckets, repeat: int = 1, cache: EncodedCache | None = None):
        if repeat < 1:
            raise DataError(f"dataset_repeat must be >= 1, got {repeat}")
        self.items, self.cache = list(items), cache
        self.buckets = list(buckets)
        self.n = len(self.items)
        self.repeat = repeat

    def __len__(self):
        return self.n * self.repeat

    def __getitem__(self, i):
        item = self.items[i % self.n]
        return self.cache.load(item) if isinstance(item, str) else item

    def bucket(self, i):
        return self.buckets[i % self.n]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches whose samples share one size bucket, shuffled per epoch from `seed` (same on every process).

    A bucket's last batch may be short, anywhere in the list. The size is deliberately not exposed as
    `batch_size`: accelerate's `BatchSamplerShard` then deals out (and pads with) whole batches; with a
    `batch_size` it assumes only the last batch is short and would drop batches or top up a short one with
    samples of another bucket.
    """

    def __init__(self, dataset: EncodedDataset, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.dataset, self.size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _batches(self):
        rng = random.Random(self.seed + self.epoch)
        groups = {}
        for i in range(len(self.dataset)):
            groups.setdefault(self.dataset.bucket(i), []).append(i)
        batches = []
        for idx in groups.values():
            if self.shuffle:
                rng.shuffle(idx)
            batches += [idx[j:j + self.size] for j in range(0, len(idx), self.size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        yield from self._batches()

    def __len__(self):
        return len(self._batches())


def collate(samples: list[dict]) -> dict:
    """Stack a same-bucket batch; text embeddings padded to the longest with a 0/1 mask (None when no padding),
    and Qwen-Image 2.1's `img_mask` padded with False (as `QwenImage21Pipeline._get_qwen_prompt_embeds` pads it)."""
    lengths = [s["prompt_embeds"].shape[0] for s in samples]
    longest = max(lengths)
    embeds = torch.stack([torch.cat([s["prompt_embeds"],
                                     s["prompt_embeds"].new_zeros(longest - n, s["prompt_embeds"].shape[1])])
                          for s, n in zip(samples, lengths)])
    mask = torch.stack([torch.arange(longest) < n for n in lengths]).long()
    extra = {}
    if "img_mask" in samples[0]:
        extra["img_mask"] = torch.stack([torch.cat([s["img_mask"], s["img_mask"].new_zeros(longest - n)])
                                         for s, n in zip(samples, lengths)])
    return {**extra, "prompt_embeds": embeds, "prompt_embeds_mask": None if bool(mask.all()) else mask,
            "target": torch.stack([s["target"] for s in samples]),
            "edits": [torch.stack([s["edits"][i] for s in samples]) for i in range(len(samples[0]["edits"]))]}
