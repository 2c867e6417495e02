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
import time

import torch

from . import data as D
from .cli_util import HelpFormatter
from .atomic import atomic_output
from .demo import train_demo_args
from .encode import build_dataset
from .flow import FlowMatching
from .pipeline import call_pipeline, compile_blocks, edit_variant, load_pipeline, parse_lora_spec
from .train_lora import DEFAULT_TARGETS, lora_targets, prepare_transformer
from .train_state import (check_output_dir, first_missing_folder, lora_state, resolve_resume, save_checkpoint,
                          save_lora_files, set_lora_state)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# arguments

def add_arguments(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", help="diffusers folder or hub id of Qwen-Image-Edit[-2509|-2511]")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate's config (bf16 on CUDA is the usual choice)")
    g.add_argument("--fp8_base", "--enable_fp8_training", dest="fp8_base", action="store_true",
                   help="store frozen base linear weights as float8_e4m3fn, upcast per use "
                        "(diffusers layerwise casting)")
    g.add_argument("--no_fuse", action="store_true", help="train the stock (unfused) transformer, for comparison")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_base_path", help="folder the metadata's image paths are relative to")
    g.add_argument("--dataset_metadata_path", help="CSV (image, edit_image, prompt) or JSON / JSONL")
    g.add_argument("--max_pixels", type=int, default=1048576, help="largest image area; sides snapped to 32")
    g.add_argument("--condition_area", type=int, default=None,
                   help="-2509/-2511: pixel area of condition images shown to the text encoder (default: the "
                        "pipeline's own, diffusers' CONDITION_IMAGE_SIZE: 384 * 384)")
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
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (diffusers' compile_repeated_blocks); the first step "
                        "then includes the compile time. Default: on with CUDA, off on a CPU")
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
    with atomic_output(path, overwrite=True) as tmp:
        out.save(tmp, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------------------
# the run

class NonFiniteLoss(RuntimeError):
    pass


def run(args) -> int:
    if args.demo:
        args = train_demo_args(args)
    missing = [f"--{flag}" for flag in ("pretrained_model_name_or_path", "dataset_base_path", "dataset_metadata_path",
                                        "output_dir") if not getattr(args, flag)]
    made = first_missing_folder(args.output_dir) if args.output_dir else None
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


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    for name in ("gradient_accumulation_steps", "train_batch_size", "save_steps", "lora_rank", "max_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.condition_area is None:  # imported here, not for --help: the pipeline module imports transformers
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

        args.condition_area = CONDITION_IMAGE_SIZE
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
    compiled = compile_blocks(transformer, args.compile, accelerator.device)
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
    t_step, first_step = time.perf_counter(), step
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
                    local = torch.stack([loss.detach().float(), loss.new_tensor(stop.signum, dtype=torch.float32)])
                    gathered = accelerator.gather(local[None])
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
                if compiled and step == first_step + 1 and accelerator.is_main_process:
                    bar.write(f"first step {logs['step_time']:.1f} s (includes compiling the blocks)")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen_fused.train", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
