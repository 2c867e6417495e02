"""`qwen-fused train` (also `accelerate launch -m qwen_fused.train ...`): LoRA training of Qwen-Image-Edit
(-2509, -2511) on the fused (merged-QKV) transformer.

The loss is diffusers' Qwen-Image LoRA training loss (examples/dreambooth/train_dreambooth_lora_qwen_image.py):
timesteps drawn with `compute_density_for_timestep_sampling` and mapped through the scheduler's own
sigma table (shifted as its config says), `x_t = (1 - sigma) x0 + sigma noise`, target `noise - x0`,
`compute_loss_weighting_for_sd3` weights; for editing, the clean condition-image latents follow the noisy target
tokens in the image stream exactly as the edit pipelines pack them (`img_shapes` one `(1, h, w)` per image;
-2511's `zero_cond_t` is applied by the transformer) and the loss covers the target tokens only.

Output folder:
  checkpoint-<step>.safetensors            LoRA, merged layout (to_qkv / add_qkv_proj; this package)
  checkpoint-<step>-standard.safetensors   the same LoRA, standard layout (to_q/k/v; diffusers, ComfyUI)
  checkpoint-final[-standard].safetensors  at the end
  state/checkpoint-<step>/                 accelerate state (LoRA, optimizer, lr scheduler, RNG) for resuming
  run.json                                 the arguments of the run that owns the folder

FSDP for full-size training: see `qwen_fused/fsdp_config.yaml`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import torch

from . import data as D
from ._util import HelpFormatter


DEFAULT_TARGETS = "to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"
CONDITION_AREA = 384 * 384  # what -2509/-2511 show the text encoder (pipeline_qwenimage_edit_plus.CONDITION_IMAGE_SIZE)
DEAD_IN_LAST_BLOCK = ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# arguments

def add_arguments(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", help="diffusers folder or hub id of Qwen-Image-Edit[-2509|-2511]")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate's config (bf16 on CUDA is the usual choice)")
    g.add_argument("--fp8_base", "--enable_fp8_training", dest="fp8_base", action="store_true",
                   help="store frozen base linear weights as float8_e4m3fn, upcast per use (diffusers layerwise casting)")
    g.add_argument("--no_fuse", action="store_true", help="train the stock (unfused) transformer, for comparison")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_base_path", help="folder the metadata's image paths are relative to")
    g.add_argument("--dataset_metadata_path", help="CSV (image, edit_image, prompt) or JSON / JSONL")
    g.add_argument("--max_pixels", type=int, default=1048576, help="largest image area; sides snapped to 32")
    g.add_argument("--condition_area", type=int, default=CONDITION_AREA,
                   help="-2509/-2511: pixel area of condition images shown to the text encoder")
    g.add_argument("--dataset_repeat", type=int, default=1, help="times each sample is used per epoch")
    g.add_argument("--cache", nargs="?", const="", default=None, metavar="DIR",
                   help="keep encoded samples (text embeddings, VAE latents) on disk and reuse them while the "
                        "inputs are unchanged (default folder: <output_dir>/cache)")
    g.add_argument("--train_batch_size", type=int, default=1, help="per process; batches are bucketed by size")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=int, default=32, help="rank of the trained LoRA")
    g.add_argument("--lora_alpha", type=float, default=None, help="default: the rank")
    g.add_argument("--lora_target_modules", default=DEFAULT_TARGETS,
                   help="comma-separated module names; to_qkv/add_qkv_proj: one LoRA over the merged projection; "
                        "to_q,to_k,to_v/add_*_proj: a LoRA each, as stock peft (block-diagonal on to_qkv)")
    g.add_argument("--lora_fused", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a pretrained LoRA (e.g. Lightning) merged into the base weights before training; repeatable")
    g.add_argument("--resume_from_checkpoint", metavar="DIR|latest",
                   help="a state/checkpoint-N folder, or 'latest' in --output_dir")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (after any warm-up)")
    g.add_argument("--weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--lr_scheduler", default="constant", help="diffusers get_scheduler name")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="optimizer steps of learning-rate warm-up")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this; 0: no clipping")
    g.add_argument("--num_epochs", type=int, default=1, help="passes over the (repeated) dataset")
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_epochs")
    g.add_argument("--use_gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, slower")
    g.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, noise, timesteps and data order")
    g.add_argument("--weighting_scheme", default="none",
                   choices=["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"],
                   help="timestep density and loss weighting (diffusers' training_utils)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal timestep density")
    g.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal timestep density")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode timestep density")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", help="default with --demo: a new temp folder")
    g.add_argument("--overwrite", action="store_true", help="allow an output folder that holds another run")
    g.add_argument("--save_steps", type=int, default=500,
                   help="save the LoRA files and a resumable state every N optimizer steps")
    g.add_argument("--no_standard_layout", action="store_true", help="skip the standard-layout LoRA copies")
    g.add_argument("--report_to", default=None, metavar="TRACKER[,TRACKER]",
                   help="log to tensorboard, wandb, ... (accelerate's trackers; logs in <output_dir>/logs); the "
                        "tracker's package must be installed (tensorboard: the train extra)")
    g.add_argument("--validation_image", action="append", default=[], help="condition image(s) for validation")
    g.add_argument("--validation_prompt", default=None, help="prompt for --validation_image")
    g.add_argument("--validation_steps", type=int, default=None, help="default: --save_steps")
    g.add_argument("--validation_inference_steps", type=int, default=20, help="denoising steps of a validation edit")
    g.add_argument("--demo", action="store_true",
                   help="tiny random Qwen-Image-Edit + synthetic data in a temp folder, a few CPU steps, offline "
                        "(rank, steps, image size and save interval default smaller)")
    g.add_argument("--demo_variant", default="edit", choices=["edit", "2509", "2511"],
                   help="the --demo model: Qwen-Image-Edit, -2509 or -2511")
    return p


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="LoRA training of Qwen-Image-Edit on the fused transformer",
                              description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


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


def check_report_to(spec):
    """--report_to -> accelerate's `log_with`. accelerate skips a tracker whose package is missing with a warning
    and the run then trains without logs: that is an error here, before anything is loaded."""
    if not spec:
        return None
    from accelerate.tracking import get_available_trackers  # the list accelerate itself filters by
    from accelerate.utils import LoggerType

    names = [s.strip() for s in spec.split(",") if s.strip()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LoggerType.list():
            raise ValueError(f"--report_to {name}: unknown tracker; choose from {', '.join(LoggerType.list())}")
        if name != "all" and name not in available:
            extra = " (it is in the train extra: pip install 'qwen-fused[train]')" if name == "tensorboard" else ""
            raise ValueError(f"--report_to {name}: the {name} package is not installed; pip install {name}{extra}")
    return names


def stock_targets(targets):
    """Merged target names -> the stock model's q/k/v names (for --no_fuse runs)."""
    from .fuse import STREAMS

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


# ----------------------------------------------------------------------------------------------------------
# the loss

def pack(latents):
    """[B, C, 1, H, W] latents -> [B, H/2 * W/2, 4C] tokens (the pipelines' `_pack_latents`)."""
    from diffusers import QwenImageEditPipeline

    b, c, _, h, w = latents.shape
    return QwenImageEditPipeline._pack_latents(latents, b, c, h, w)


class FlowMatching:
    """diffusers' flow-matching timestep sampling, noising and loss weighting, from a scheduler's tables."""

    def __init__(self, scheduler, weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
        fresh = type(scheduler).from_config(scheduler.config)  # tables as constructed (no set_timesteps)
        self.timesteps = fresh.timesteps.float()
        self.sigmas = fresh.sigmas.float()
        self.num_train_timesteps = fresh.config.num_train_timesteps
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    def sample(self, batch_size, device):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, self.logit_mean,
                                                  self.logit_std, self.mode_scale)
        idx = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        return self.timesteps[idx].to(device), self.sigmas[idx].to(device)

    def loss(self, transformer, batch, dtype=None, noise=None, timesteps=None, sigmas=None):
        """Mean weighted MSE on the target tokens; returns (loss, details). Noise/timesteps drawn if not given;
        the transformer's inputs are cast to `dtype` (the base weights' dtype) as diffusers does."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        x0 = batch["target"]
        dtype = dtype or x0.dtype
        bsz = x0.shape[0]
        if noise is None:
            noise = torch.randn_like(x0)
        if timesteps is None:
            timesteps, sigmas = self.sample(bsz, x0.device)
        s = sigmas.to(x0.dtype).view(bsz, 1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        tokens = [pack(noisy)] + [pack(e) for e in batch["edits"]]
        n_target = tokens[0].shape[1]
        img_shapes = [[(1, t.shape[3] // 2, t.shape[4] // 2) for t in [x0, *batch["edits"]]]] * bsz
        pred = transformer(hidden_states=torch.cat(tokens, dim=1).to(dtype),
                           encoder_hidden_states=batch["prompt_embeds"].to(dtype),
                           encoder_hidden_states_mask=batch["prompt_embeds_mask"],
                           timestep=(timesteps / 1000).to(dtype), img_shapes=img_shapes, return_dict=False)[0]
        pred = pred[:, :n_target]
        target = pack(noise - x0)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas=sigmas).view(bsz, 1, 1)
        loss = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1).mean()
        return loss, {"timesteps": timesteps, "sigmas": sigmas, "noise": noise}


# ----------------------------------------------------------------------------------------------------------
# model set-up

def edit_variant(pipe) -> str:
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    if isinstance(pipe, QwenImageEditPlusPipeline):
        return "2511" if pipe.transformer.config.get("zero_cond_t") else "2509"
    if isinstance(pipe, QwenImageEditPipeline):
        return "edit"
    raise TypeError(f"expected a Qwen-Image-Edit pipeline (QwenImageEditPipeline or QwenImageEditPlusPipeline), "
                    f"got {type(pipe).__name__}")


def load_pipeline(path, dtype=torch.float32):
    """The stock pipeline from a diffusers folder, a Hub id or the Hugging Face cache, resolved as
    `DiffusionPipeline.from_pretrained` resolves them. A name found nowhere is a FileNotFoundError that says
    what was tried."""
    from diffusers import DiffusionPipeline

    from . import tiny  # noqa: F401  (defines the tiny pipelines' processor class, so saved ones load too)

    path = os.fspath(path)
    if not os.path.isdir(path) and _looks_local(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
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


def add_training_lora(transformer, rank, alpha, targets, init="gaussian"):
    """A peft adapter "default" on `targets` through `transformer.add_adapter`, which on a fused model takes
    merged names as they are and maps standard q/k/v names (see `lora_targets`)."""
    from peft import LoraConfig

    from .fuse import STREAMS

    existing = {n.rsplit(".", 1)[-1] for n, _ in transformer.named_modules()}
    existing |= {std for merged, stds in STREAMS.items() if merged in existing for std in stds}
    missing = [t for t in targets if t.split(".")[0] not in existing]
    if missing:
        raise ValueError(f"LoRA target modules not in this transformer: {', '.join(missing)}")
    # the last block's text output is discarded by the transformer: LoRAs there would get no gradient
    # (and DDP would wait for one forever)
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    dead = [f"{last}.{n}" for n in DEAD_IN_LAST_BLOCK]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                       init_lora_weights=init, target_modules=targets, exclude_modules=dead))
    return transformer


def lora_state(transformer, with_alpha=False) -> dict:
    """The trainable LoRA as a peft-keyed state dict on CPU; FSDP shards (DTensor) are gathered, so under
    FSDP every process must call this. `with_alpha` adds `<module>.alpha` keys (what the LoRA files carry)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
             for k, v in get_peft_model_state_dict(transformer).items()}
    if with_alpha:
        for name, mod in transformer.named_modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_alpha:
                state[f"{name}.alpha"] = torch.tensor(float(mod.lora_alpha["default"]))
    return state


def set_lora_state(transformer, state):
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint LoRA does not fit this model: unexpected keys {unexpected[:5]}")


def enable_fp8_base(transformer, compute_dtype):
    """Frozen linear weights stored as float8_e4m3fn, upcast to `compute_dtype` around each use: diffusers'
    `enable_layerwise_casting`, as on a stock model (the fused processor runs hooked projections through
    their own forward, so the casting hooks apply to to_qkv / add_qkv_proj as to any Linear)."""
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    return transformer


def prepare_transformer(pipe, args, targets, fused_loras=(), weight_dtype=torch.float32):
    """Freeze, fuse (unless --no_fuse), merge --lora_fused LoRAs into the base, fp8 storage, add the LoRA."""
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
        enable_fp8_base(transformer, weight_dtype)
    return transformer


# ----------------------------------------------------------------------------------------------------------
# encoding the dataset (text encoder + VAE, then they can leave the GPU)

@torch.no_grad()
def encode_sample(pipe, record: D.Record, plan: D.Plan, device) -> dict:
    variant = edit_variant(pipe)
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


def build_dataset(args, pipe, accelerator, records):
    variant = edit_variant(pipe)
    if variant == "edit" and len(records[0].edit_images) != 1:
        raise D.DataError(f"Qwen-Image-Edit takes one edit image per sample; the metadata has "
                          f"{len(records[0].edit_images)} (use -2509/-2511 for several)")
    plans = [D.plan_sample(r, args.max_pixels, None if variant == "edit" else args.condition_area) for r in records]
    device = accelerator.device
    pipe.text_encoder.to(device)
    pipe.vae.to(device)
    if args.cache is not None:
        cache = D.EncodedCache(args.cache or os.path.join(args.output_dir, "cache"))
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


# ----------------------------------------------------------------------------------------------------------
# output folder and checkpoints

def check_output_dir(args, accelerator):
    out = args.output_dir
    if not out:
        raise ValueError("--output_dir is required")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out} exists and is not a folder")
    # read-only checks on every process: all of them stop with the message, none waits for a failed main
    if os.path.isdir(out) and not args.resume_from_checkpoint and not args.overwrite:
        theirs = [f for f in os.listdir(out) if f in ("run.json", "state") or f.startswith("checkpoint-")]
        if theirs:
            raise ValueError(f"--output_dir {out} holds another run ({', '.join(sorted(theirs)[:3])}); pass "
                             f"--overwrite to replace it or --resume_from_checkpoint latest to continue it")
    if accelerator.is_main_process:
        try:
            os.makedirs(out, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-", delete=True)
            probe.close()
        except OSError as e:
            raise ValueError(f"--output_dir {out} is not writable: {e}") from e
        if args.overwrite and not args.resume_from_checkpoint:
            for f in os.listdir(out):
                if f.startswith("checkpoint-") and f.endswith(".safetensors"):
                    os.unlink(os.path.join(out, f))
            shutil.rmtree(os.path.join(out, "state"), ignore_errors=True)
    accelerator.wait_for_everyone()


def resolve_resume(args):
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        folder = os.path.join(args.output_dir, "state")
        steps = sorted(int(d.split("-")[1]) for d in os.listdir(folder)
                       if d.startswith("checkpoint-") and d.split("-")[1].isdigit()) if os.path.isdir(folder) else []
        if not steps:
            raise ValueError(f"--resume_from_checkpoint latest: no state/checkpoint-N folder in {args.output_dir}")
        path = os.path.join(folder, f"checkpoint-{steps[-1]}")
    else:
        path = args.resume_from_checkpoint
        if not os.path.isfile(os.path.join(path, "train_state.json")):
            raise ValueError(f"--resume_from_checkpoint {path} is not a training state folder (no train_state.json)")
    check_resume_settings(args, path)
    return path


# what decides the model and the shape of its LoRA: a resumed run must have them as its checkpoint was trained
# (precision, optimisation and data settings may change, e.g. to fit another card)
MODEL_SETTINGS = ("pretrained_model_name_or_path", "no_fuse", "lora_fused", "lora_rank", "lora_alpha",
                  "lora_target_modules")


def _model_setting(name, settings: dict) -> str:
    """One of MODEL_SETTINGS from a run's arguments, as the model sees it (alpha: the rank when not given;
    targets: a set of names; --lora_fused: path and scale)."""
    value = settings[name]
    if name == "lora_alpha":
        return str(float(value if value is not None else settings["lora_rank"]))
    if name == "lora_target_modules":
        return ",".join(sorted(lora_targets(value)))
    if name == "lora_fused":
        return ",".join(f"{p}:{s:g}" for p, s in (parse_lora_spec(v, "--lora_fused") for v in value))
    return str(value)


def check_resume_settings(args, checkpoint):
    """Compare with the run.json of the run that wrote `checkpoint` (<run>/state/checkpoint-N)."""
    record = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "run.json")
    if not os.path.isfile(record):
        return  # a state folder moved out of its run: nothing to compare with
    with open(record) as f:
        recorded = json.load(f)
    names = [n for n in MODEL_SETTINGS if n in recorded]
    if args.demo and recorded.get("demo"):  # --demo makes its tiny model in a new temp folder on every run
        names = ["demo_variant" if n == "pretrained_model_name_or_path" else n for n in names]
    pairs = [(n, _model_setting(n, vars(args)), _model_setting(n, recorded)) for n in names]
    differ = [f"--{n} {now} (checkpoint: {then})" for n, now, then in pairs if now != then]
    if differ:
        raise ValueError(f"--resume_from_checkpoint {checkpoint} was trained with other model settings ({record}): "
                         f"{'; '.join(differ)}. Resume with the checkpoint's settings, or train into a new "
                         f"--output_dir")


def save_lora_files(state, output_dir, name, standard=True):
    """`<name>.safetensors` (merged layout) and `<name>-standard.safetensors` from `lora_state(..., with_alpha=True)`,
    each written atomically (diffusers keys and metadata)."""
    from .lora import save_lora

    paths = [os.path.join(output_dir, f"{name}.safetensors")]
    save_lora(state, paths[0], to="merged", overwrite=True)
    if standard:
        paths.append(os.path.join(output_dir, f"{name}-standard.safetensors"))
        save_lora(state, paths[1], to="standard", overwrite=True)
    return paths


def save_checkpoint(accelerator, transformer, args, step, epoch, name=None):
    """LoRA files plus the accelerate state under state/checkpoint-<step> (written to a temp folder, renamed)."""
    name = name or f"checkpoint-{step}"
    final = os.path.join(args.output_dir, "state", f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    state = lora_state(accelerator.unwrap_model(transformer), with_alpha=True)
    accelerator.wait_for_everyone()  # save_state returns without a barrier: every process's files must be in tmp
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump({"step": step, "epoch": epoch}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        save_lora_files(state, args.output_dir, name, standard=not args.no_standard_layout)
    accelerator.wait_for_everyone()
    return final


class StopRequest:
    """SIGTERM / Ctrl-C: finish the current step, save a resumable state, exit. A second Ctrl-C aborts.

    `signum` is this process's request (0: none). Under several processes the signal reaches them at different
    moments; the loop acts on the maximum over all processes, gathered with the loss, so that all stop after
    the same step (one stopping alone would wait in a collective the others never join)."""

    def __init__(self):
        self.reason = None
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        self.signum = max(self.signum, int(signum))
        print(f"\n{self.reason}: saving a resumable state after this step (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------------------
# validation

def validate(pipe, transformer, args, step, accelerator):
    """One edit with the model being trained (the run's max_pixels as target area), saved as validation/step-N.png."""
    from .edit import call_pipeline

    images = [D.open_rgb(p, "--validation_image") for p in args.validation_image]
    model = accelerator.unwrap_model(transformer)
    was_training = model.training
    model.eval()
    pipe.transformer = model
    pipe.text_encoder.to(accelerator.device)
    pipe.vae.to(accelerator.device)
    try:
        out = call_pipeline(pipe, area=args.max_pixels, image=images[0] if edit_variant(pipe) == "edit" else images,
                            prompt=args.validation_prompt, num_inference_steps=args.validation_inference_steps,
                            true_cfg_scale=1.0, generator=torch.Generator().manual_seed(args.seed)).images[0]
    finally:
        pipe.text_encoder.to("cpu")
        pipe.vae.to("cpu")
        model.train(was_training)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step}.png")
    out.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
    return path


# ----------------------------------------------------------------------------------------------------------
# the run

class NonFiniteLoss(RuntimeError):
    pass


def run(args) -> int:
    if args.demo:
        args = demo_args(args)
    missing = [f"--{flag}" for flag in ("pretrained_model_name_or_path", "dataset_base_path", "dataset_metadata_path",
                                        "output_dir") if not getattr(args, flag)]
    made = _first_missing_folder(args.output_dir) if args.output_dir else None
    try:
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)} (or use --demo)")
        return train(args)
    except (D.DataError, NonFiniteLoss, ValueError, FileNotFoundError) as e:
        print(f"qwen-fused train: error: {e}", file=sys.stderr)
        return 2
    finally:
        # a run that stops before it starts training (run.json) removes the folders it made: nothing in them is a
        # result yet, and a half-made output folder would only be in the way of the next try
        if made and os.path.isdir(made) and not os.path.exists(os.path.join(args.output_dir, "run.json")):
            from accelerate import PartialState

            if PartialState().is_main_process:  # the one that made them (check_output_dir)
                shutil.rmtree(made, ignore_errors=True)


def _first_missing_folder(path):
    """The outermost folder of `path` that does not exist yet (what `os.makedirs(path)` would make first)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    for name in ("gradient_accumulation_steps", "train_batch_size", "save_steps", "lora_rank", "max_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    # all input checks before any model is loaded
    records = D.read_metadata(args.dataset_base_path, args.dataset_metadata_path)
    targets = lora_targets(args.lora_target_modules)
    fused_loras = [parse_lora_spec(s, "--lora_fused") for s in args.lora_fused]
    for path, _ in fused_loras:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora_fused {path} does not exist")
    for p in args.validation_image:
        D.open_rgb(p, "--validation_image")
    if args.validation_image and not args.validation_prompt:
        raise ValueError("--validation_image needs --validation_prompt")
    trackers = check_report_to(args.report_to)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
    )
    if args.validation_image and accelerator.distributed_type == DistributedType.FSDP:
        # validation runs on the main process only; a sharded model needs every rank in each forward
        raise ValueError("--validation_image is not supported under FSDP (validation runs on one process); "
                         "drop it, or validate the saved LoRA with `qwen-fused edit`")
    check_output_dir(args, accelerator)
    resume = resolve_resume(args)
    set_seed(args.seed, device_specific=True)
    weight_dtype = DTYPES[accelerator.mixed_precision]

    pipe = load_pipeline(args.pretrained_model_name_or_path, dtype=weight_dtype)
    transformer = prepare_transformer(pipe, args, targets, fused_loras, weight_dtype)
    dataset = build_dataset(args, pipe, accelerator, records)
    transformer.to(accelerator.device)
    if args.use_gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_epsilon)
    sampler = D.BucketBatchSampler(dataset, args.train_batch_size, seed=args.seed)
    # its own generator: each pass otherwise draws a seed from the global RNG that makes the noise, and a
    # resume mid-epoch (the pass started before the checkpoint) would then draw different noise
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=D.collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    batches_per_epoch = math.ceil(len(sampler) / accelerator.num_processes)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    params = [p for p in transformer.parameters() if p.requires_grad]  # FSDP2's prepare replaces them (DTensor)

    def save_hook(models, weights, folder):
        from safetensors.torch import save_file

        for m in models:  # LoRA only: the frozen base is not part of the training state
            state = lora_state(accelerator.unwrap_model(m))  # every process: gathers FSDP shards
            if accelerator.is_main_process:
                save_file(state, os.path.join(folder, "lora.safetensors"))
            if weights:
                weights.pop()

    def load_hook(models, folder):
        from safetensors.torch import load_file

        while models:
            set_lora_state(accelerator.unwrap_model(models.pop()), load_file(os.path.join(folder, "lora.safetensors")))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    step, first_epoch, skip = 0, 0, 0
    if resume:
        with open(os.path.join(resume, "train_state.json")) as f:
            state = json.load(f)
        accelerator.load_state(resume)
        step = state["step"]
        first_epoch = step // steps_per_epoch
        skip = (step % steps_per_epoch) * args.gradient_accumulation_steps
        accelerator.print(f"resumed from {resume} at step {step}")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "func"}, f, indent=1)
        accelerator.init_trackers("qwen-fused-train", config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})

    flow = FlowMatching(pipe.scheduler, args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    validation_every = args.validation_steps or args.save_steps
    last_saved, losses, stop_signum = resume, [], 0
    transformer.train()
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    t_step = time.perf_counter()
    with StopRequest() as stop:
        epoch = first_epoch
        while step < max_steps and not stop_signum:
            # the loader sets its sampler's epoch from its own pass count, which restarts at 0 on resume (one
            # process); under several processes accelerate's shard wrapper hides the sampler from it: set both
            loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            for batch in batches:
                batch = _to(batch, accelerator.device)
                with accelerator.accumulate(transformer):
                    loss, _ = flow.loss(transformer, batch, dtype=weight_dtype)
                    # one collective per micro-step: every process's loss and stop request (see StopRequest)
                    gathered = accelerator.gather(torch.stack([loss.detach().float(),
                                                               loss.new_tensor(stop.signum, dtype=torch.float32)])[None])
                    all_losses, stop_signum = gathered[:, 0], int(gathered[:, 1].max())
                    if not torch.isfinite(all_losses).all():
                        raise NonFiniteLoss(f"non-finite loss {all_losses.tolist()} at step {step + 1}; stopped. "
                                            f"Last good checkpoint: {last_saved or 'none saved yet'}")
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                losses.append(all_losses.mean().item())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                now = time.perf_counter()
                logs = {"loss": sum(losses) / len(losses), "lr": lr_scheduler.get_last_lr()[0],
                        "step_time": now - t_step}
                t_step, losses = now, []
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                if accelerator.device.type == "cuda":
                    logs["peak_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=step)
                if step % args.save_steps == 0 or stop_signum or step >= max_steps:
                    last_saved = save_checkpoint(accelerator, transformer, args, step, epoch)
                if args.validation_image and step % validation_every == 0 and accelerator.is_main_process:
                    validate(pipe, transformer, args, step, accelerator)
                if step >= max_steps or stop_signum:
                    break
            else:
                epoch += 1
        bar.close()
    if stop_signum:
        accelerator.print(f"stopped by {signal.Signals(stop_signum).name} at step {step}; resume with "
                          f"--resume_from_checkpoint {last_saved}")
        accelerator.end_training()
        return 128 + stop_signum
    state = lora_state(accelerator.unwrap_model(transformer), with_alpha=True)
    if accelerator.is_main_process:
        paths = save_lora_files(state, args.output_dir, "checkpoint-final", standard=not args.no_standard_layout)
        print(f"trained {step} steps; LoRA: {', '.join(paths)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _to(batch, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v] if isinstance(v, list)
                else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# --demo

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


def demo_args(args):
    """Fill in a tiny offline run: a saved tiny pipeline and synthetic data in a temp folder."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from ._util import scratch_folder
    from .tiny import save_tiny_pipeline

    # under a multi-process launch the main process builds, the others use its folder; `cpu` as Accelerator
    # reads it, so that both see the same distributed set-up (torchrun on CPU: ACCELERATE_USE_CPU=1)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    # the tiny model and data only feed this run: they go when the main process exits; the output stays
    folders = [None, None]
    if state.is_main_process:
        folders = [scratch_folder("qwen-fused-demo-"),
                   args.output_dir or tempfile.mkdtemp(prefix="qwen-fused-demo-output-")]
    if state.num_processes > 1:
        broadcast_object_list(folders)
    work, args.output_dir = folders
    model_path, data_path = os.path.join(work, "model"), os.path.join(work, "data")
    if state.is_main_process:
        if not args.pretrained_model_name_or_path:
            save_tiny_pipeline(model_path, seed=args.seed, variant=args.demo_variant)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen_fused.train", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
