"""The stock Qwen-Image-Edit pipelines (and `QwenImage21Pipeline`) as `qwen-fused train` and `qwen-fused edit` both
use them: loading one from a folder, a Hub id or the cache, telling its variant, the PATH[:SCALE] LoRA specs of both CLIs, and calling it with
other image areas than the stock constants."""
from __future__ import annotations

import os
import types

import torch


def parse_lora_spec(spec: str, flag: str = "--lora"):
    """'path' or 'path:scale' -> (path, scale), for every PATH[:SCALE] option (`flag` names it in errors).
    An existing `spec` is a path even if it holds ':'."""
    path, _, scale = spec.rpartition(":")
    if path and not os.path.exists(spec):
        try:
            return path, float(scale)
        except ValueError:
            if os.path.exists(path):  # else the caller reports `spec` as missing
                raise ValueError(f"bad scale '{scale}' in {flag} {spec} (expected PATH or PATH:SCALE)") from None
    return spec, 1.0


def check_lora_path(path, flag="--lora"):
    """A PATH of a PATH[:SCALE] option names a LoRA file, or a folder holding exactly one (as `load_lora` reads
    folders); checked before any model loads."""
    if os.path.isdir(path):
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        if len(files) != 1:
            raise ValueError(f"{flag} {path} is a folder with {len(files)} .safetensors files; pass the LoRA file")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} does not exist")


def check_model_path(path, flag):
    """A local model folder must be a diffusers pipeline (model_index.json); diffusers' own error for one that is
    not is an OSError naming the file it did not find."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        what = ("one model of a pipeline (it has a config.json); pass the pipeline folder above it"
                if os.path.isfile(os.path.join(path, "config.json")) else "not a diffusers pipeline folder")
        raise ValueError(f"{flag} {path}: no model_index.json, {what}")


# the pipeline classes train and edit run (model_index.json's `_class_name`), and whether they need a condition image;
# `edit_variant` tells the same classes apart once loaded (by isinstance): a new one goes into both
PIPELINES = {"QwenImageEditPipeline": True, "QwenImageEditPlusPipeline": True, "QwenImage21Pipeline": False}


def _unsupported(name) -> str:
    return (f"{name} is not supported: qwen-fused trains and edits with Qwen-Image-Edit, -2509, -2511 "
            f"(QwenImageEditPipeline, QwenImageEditPlusPipeline) and Qwen-Image 2.1 (QwenImage21Pipeline)"
            + ("; Qwen-Image text-to-image (QwenImagePipeline) is not" if name == "QwenImagePipeline" else ""))


def pipeline_class_name(path) -> str | None:
    """The pipeline class a model folder (or a cached Hub id) names in its model_index.json, before any loading;
    None when that file is not at hand yet (a Hub id not downloaded)."""
    import json

    path = os.fspath(path)
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        if os.path.isdir(path) or _looks_local(path):
            return None
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(path, "model_index.json")
        if not isinstance(index, str):
            return None
    try:
        with open(index, encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None  # diffusers' own loading reports a broken file


def needs_condition_image(path) -> bool | None:
    """Whether the model at `path` edits (every sample needs a condition image) or also generates from text
    (Qwen-Image 2.1), from its model_index.json; None when not known before loading. Unsupported pipelines raise."""
    name = pipeline_class_name(path)
    if name is None:
        return None
    if name not in PIPELINES:
        raise ValueError(f"{path}: {_unsupported(name)}")
    return PIPELINES[name]


def edit_variant(pipe) -> str:
    """"edit", "2509", "2511" (Qwen-Image-Edit pipelines) or "2.1" (`QwenImage21Pipeline`): what the train and edit
    CLIs branch on; found from the loaded pipeline, so from the model folder's config."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    if isinstance(pipe, QwenImageEditPlusPipeline):
        return "2511" if pipe.transformer.config.get("zero_cond_t") else "2509"
    if isinstance(pipe, QwenImageEditPipeline):
        return "edit"
    cls21 = _pipeline21()
    if cls21 is not None and isinstance(pipe, cls21):
        return "2.1"
    raise ValueError(_unsupported(type(pipe).__name__))


def _pipeline21():
    try:
        from diffusers import QwenImage21Pipeline
    except ImportError:  # diffusers < 0.42
        return None
    return QwenImage21Pipeline


def load_pipeline(path, dtype=torch.float32):
    """The stock pipeline from a diffusers folder, a Hub id or the Hugging Face cache, resolved as
    `DiffusionPipeline.from_pretrained` resolves them. A name found nowhere is a FileNotFoundError that says
    what was tried."""
    from diffusers import DiffusionPipeline

    from . import tiny  # noqa: F401  (defines the tiny pipelines' processor class, so saved ones load too)

    if _pipeline21() is not None:
        from .families import tiny21_pipeline  # noqa: F401  (the same for the tiny 2.1 pipelines)

    path = os.fspath(path)
    if not os.path.isdir(path) and _looks_local(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    check_model_path(path, "model folder")
    from diffusers.utils import deprecation_utils

    # diffusers renamed torch_dtype to dtype (0.42: `_resolve_dtype`); older releases know torch_dtype only
    key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **{key: dtype})
    except OSError as e:
        if os.path.isdir(path) or _cached(path):  # found, but broken: diffusers' own error says how
            raise
        raise FileNotFoundError(_not_found(path, e)) from e
    edit_variant(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _looks_local(name) -> bool:
    """A path, not a Hub id: no valid `[org/]name` id (/x, ./x, ~/x, a/b/c and C:\\x all are not)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _cached(repo_id) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)


def _not_found(repo_id, error) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    # diffusers reports a Hub it could not ask as "not cached", with the Hub's own error as the cause
    cause = error.__cause__ or error
    why = (str(cause).splitlines() or [""])[0]
    if constants.HF_HUB_OFFLINE:
        hub = "the Hub was not asked (offline: HF_HUB_OFFLINE is set)"
    elif isinstance(cause, HfHubHTTPError):
        hub = f"the Hub answered: {why}"
    else:
        hub = f"the Hub is not reachable ({type(cause).__name__}: {why})"
    return (f"model {repo_id} not found: no local folder {os.path.abspath(repo_id)}; not in the Hugging Face "
            f"cache at {constants.HF_HUB_CACHE}; {hub}")


def call_pipeline(pipe, *, area: int | None = None, condition_area: int | None = None, **kwargs):
    """Call a stock `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` with other target areas.

    The stock `__call__` resizes each condition image to a fixed pixel area (diffusers' `VAE_IMAGE_SIZE`,
    `1024 * 1024`; aspect kept, sides snapped to 32) before the VAE, and -2509/-2511 to `CONDITION_IMAGE_SIZE`
    (`384 * 384`) for the text encoder; the first area also sets the default output size. `area` /
    `condition_area` replace those constants. This runs the stock `__call__` code itself, with a private copy of
    its module globals in which only those constants differ (its own `calculate_dimensions`, given `area`
    where it was asked for the stock area): nothing in diffusers is modified and no pipeline code is copied.
    Without either argument this is exactly `pipe(**kwargs)`.
    """
    if area is None and condition_area is None:
        return pipe(**kwargs)
    if edit_variant(pipe) == "2.1":
        # `QwenImage21Pipeline.__call__` has the area as a parameter: condition images (for the text encoder and
        # the VAE alike, one resize) and the default output size are `output_resolution ** 2` pixels
        if condition_area is not None:
            raise ValueError("Qwen-Image 2.1 resizes condition images once, for the text encoder and the VAE "
                             "alike: it has no separate condition area")
        return pipe(**kwargs, output_resolution=round(area ** 0.5))
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE

    stock_call = type(pipe).__call__
    raw = getattr(stock_call, "__wrapped__", stock_call)  # under @torch.no_grad()
    env = dict(raw.__globals__)
    if "calculate_dimensions" not in env:
        raise TypeError(f"{type(pipe).__name__} is not a Qwen-Image-Edit pipeline; cannot change its areas")
    if area is not None:
        stock_dims = env["calculate_dimensions"]

        def calculate_dimensions(target_area, ratio):
            return stock_dims(area if target_area == VAE_IMAGE_SIZE else target_area, ratio)

        env["calculate_dimensions"] = calculate_dimensions
    if condition_area is not None and "CONDITION_IMAGE_SIZE" in env:
        env["CONDITION_IMAGE_SIZE"] = condition_area
    call = types.FunctionType(raw.__code__, env, raw.__name__, raw.__defaults__, raw.__closure__)
    call.__kwdefaults__ = raw.__kwdefaults__
    with torch.no_grad():
        return call(pipe, **kwargs)


def compile_blocks(transformer, compile_flag, device) -> bool:
    """`--compile` / `--no-compile` (None: on with CUDA, where it pays; off on a CPU, where compiling takes longer
    than a short run saves): diffusers' regional compilation of the transformer blocks, fullgraph (the fused
    processor and its op are fullgraph-safe, so a graph break is a bug to see, not a slowdown to hide). Layerwise
    casting (`--fp8_base`) is not compiled: its hooks re-create parameters around every Linear, which fails under
    torch.compile on a stock diffusers model too (torch 2.13, diffusers 0.42). Returns whether it compiled."""
    casting = any(getattr(m, "_diffusers_hook", None) is not None
                  and m._diffusers_hook.get_hook("layerwise_casting") is not None for m in transformer.modules())
    if compile_flag is None:
        compile_flag = torch.device(device).type == "cuda" and not casting
    if compile_flag and casting:
        raise ValueError("--compile does not work with fp8 layerwise casting (--fp8_base): diffusers' casting hooks "
                         "fail under torch.compile, on a stock model too; use --no-compile")
    if compile_flag:
        transformer.compile_repeated_blocks(fullgraph=True)
    return bool(compile_flag)
