"""`qwen-fused train` (also `accelerate launch -m qwen_fused.train ...`): the run. Its options, the output folder
and the loss are described in `train_args.py` (the `--help` text, which imports neither torch nor diffusers).

FSDP for full-size training: see `qwen_fused/fsdp_config.yaml`.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import torch

from . import data as D
from .cli_util import ArgumentParser, HelpFormatter
from .atomic import atomic_output
from .demo import train_demo_args
from .encode import build_dataset, cache_folder
from .flow import FlowMatching
from .pipeline import (call_pipeline, check_lora_path, check_model_path, compile_blocks, edit_variant, load_pipeline,
                       needs_condition_image, parse_lora_spec)
from .train_args import DESCRIPTION, add_arguments  # noqa: F401  (add_arguments: this module's API)
from .train_lora import DEFAULT_TARGETS, lora_targets, prepare_transformer
from .train_state import (check_output_dir, first_missing_folder, lora_state, remove_made_folder, resolve_resume,
                          save_checkpoint, save_lora_files, set_lora_state)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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

VALIDATION_NEEDS_IMAGE = ("--validation_prompt needs --validation_image (an edit model edits an image; Qwen-Image 2.1 "
                          "also validates from the prompt alone)")


def validate(pipe, transformer, args, step, accelerator):
    """One image per --validation_prompt (an edit of --validation_image; 2.1 without one: text-to-image) with the
    model being trained (the run's max_pixels as target area), saved as validation/step-N.png (step-N-<i>.png for
    several prompts) and sent to the trackers. Returns the paths."""
    images = [D.open_rgb(p, "--validation_image") for p in args.validation_image]
    image = images[0] if edit_variant(pipe) == "edit" else images or None  # 2.1 without one: text-to-image
    model = accelerator.unwrap_model(transformer)
    was_training = model.training
    model.eval()
    pipe.transformer = model
    pipe.text_encoder.to(accelerator.device)
    pipe.vae.to(accelerator.device)
    try:
        outs = [call_pipeline(pipe, area=args.max_pixels, image=image, prompt=prompt,
                              num_inference_steps=args.validation_inference_steps, true_cfg_scale=1.0,
                              generator=torch.Generator().manual_seed(args.seed)).images[0]
                for prompt in args.validation_prompt]
    finally:
        pipe.text_encoder.to("cpu")
        pipe.vae.to("cpu")
        model.train(was_training)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, out in enumerate(outs):
        paths.append(os.path.join(folder, f"step-{step}.png" if len(outs) == 1 else f"step-{step}-{i}.png"))
        with atomic_output(paths[-1], overwrite=True) as tmp:
            out.save(tmp, format="PNG")
    log_images(accelerator, outs, step)
    return paths


def log_images(accelerator, images, step):
    """Validation images to the trackers that take images (accelerate's `log_images`: tensorboard, wandb, ...)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        for i, image in enumerate(images):
            kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({f"validation/{i}": np.asarray(image)[None]}, step=step, **kwargs)


def run_summary(args, dataset, steps_per_epoch, max_steps, params, compiled, accelerator) -> str:
    """What the run is about to do, printed once before the first step (as diffusers' scripts do)."""
    import collections

    sizes = collections.Counter(f"{t[0]}x{t[1]}" for t, _ in (dataset.bucket(i) for i in range(dataset.n)))
    trainable = sum(p.numel() for p in params)
    batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    at = ", ".join(f"{n} at {s}" for s, n in sizes.items())
    return (f"run: {dataset.n} samples x {args.dataset_repeat} repeat ({at}); "
            f"{max_steps} steps ({steps_per_epoch} per epoch), batch {batch} "
            f"({args.train_batch_size} x {args.gradient_accumulation_steps} accumulated x {accelerator.num_processes} "
            f"processes); LoRA rank {args.lora_rank}, {trainable:,} trainable parameters; "
            f"{'stock' if args.no_fuse else 'fused'} attention, precision {accelerator.mixed_precision}"
            f"{', fp8 base' if args.fp8_base else ''}, blocks {'compiled' if compiled else 'not compiled'}")


# ----------------------------------------------------------------------------------------------------------
# the run

class NonFiniteLoss(RuntimeError):
    pass


class StoppedBeforeTraining(Exception):
    """SIGTERM while the run loads or encodes (Ctrl-C is Python's KeyboardInterrupt): stop with one line, and
    let the clean-up run (the default SIGTERM action would kill the process in the middle of it)."""


def _stop_before_training(signum, frame):
    raise StoppedBeforeTraining(signal.Signals(signum).name)


def run(args) -> int:
    if args.demo:
        args = train_demo_args(args)
    missing = [f"--{flag}" for flag in ("pretrained_model_name_or_path", "dataset_base_path", "dataset_metadata_path",
                                        "output_dir") if not getattr(args, flag)]
    made = first_missing_folder(args.output_dir) if args.output_dir else None
    try:
        old_term = signal.signal(signal.SIGTERM, _stop_before_training)  # training installs its own (StopRequest)
    except ValueError:  # not the main thread
        old_term = None
    started = lambda: bool(args.output_dir) and os.path.exists(os.path.join(args.output_dir, "run.json"))  # noqa: E731
    code, message = None, None
    try:
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)} (or use --demo)")
        return train(args)
    except (D.DataError, NonFiniteLoss, ValueError, FileNotFoundError) as e:
        code, message = 2, f"qwen-fused train: error: {e}"
    except (KeyboardInterrupt, StoppedBeforeTraining) as e:
        name = str(e) if isinstance(e, StoppedBeforeTraining) else "SIGINT"
        code = 128 + int(signal.Signals[name])
        message = f"\nqwen-fused train: stopped by {name}{'' if started() else ' before training'}"
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        # a run that stops before it starts training (run.json) removes the folders it made: nothing in them is a
        # result yet, and a half-made output folder would only be in the way of the next try. Encoded samples
        # are kept: they are reusable work (the next run with --cache picks them up)
        kept = 0
        if made and os.path.isdir(made) and not started():
            from accelerate import PartialState

            if PartialState().is_main_process:  # the one that made them (check_output_dir)
                kept = remove_made_folder(made, keep=cache_folder(args))
        if message:
            note = f" ({kept} encoded samples kept in {cache_folder(args)} for the next run)" if kept else ""
            print(f"{message}{note}", file=sys.stderr)
    return code


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    for name in ("gradient_accumulation_steps", "train_batch_size", "save_steps", "lora_rank", "num_epochs",
                 "max_train_steps", "dataset_repeat"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # 0 epochs: an untrained "final" LoRA
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_pixels < D.MULTIPLE ** 2:  # sides are snapped to 32: anything smaller would train at 32x32
        raise ValueError(f"--max_pixels {args.max_pixels} is below the smallest training size, {D.MULTIPLE} x "
                         f"{D.MULTIPLE} = {D.MULTIPLE ** 2} pixels")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate:g}")
    condition_area_given = args.condition_area is not None
    if args.condition_area is None:  # imported here, not for --help: the pipeline module imports transformers
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

        args.condition_area = CONDITION_IMAGE_SIZE
    # all input checks before any model is loaded
    # whether rows need an edit_image is the model's to say (2.1 also trains text-to-image): checked below from
    # model_index.json, or once the model is loaded (build_dataset) where that file is not at hand yet
    records = D.read_metadata(args.dataset_base_path, args.dataset_metadata_path, require_conditions=False)
    targets = lora_targets(args.lora_target_modules)
    fused_loras = [parse_lora_spec(s, "--lora_fused") for s in args.lora_fused]
    for path, _ in fused_loras:
        check_lora_path(path, "--lora_fused")
    check_model_path(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    edits = needs_condition_image(args.pretrained_model_name_or_path)
    if edits is not None:  # known from model_index.json: the rows are checked now, not after loading
        D.check_conditions(records, text_to_image=not edits)
    for p in args.validation_image:
        D.open_rgb(p, "--validation_image")
    if args.validation_image and not args.validation_prompt:
        raise ValueError("--validation_image needs --validation_prompt")
    if edits and args.validation_prompt and not args.validation_image:
        raise ValueError(VALIDATION_NEEDS_IMAGE)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    args.output_name = args.output_name.removesuffix(".safetensors")
    if not args.output_name or os.sep in args.output_name or args.output_name.startswith("."):
        raise ValueError(f"--output_name {args.output_name!r}: a file name, without folders")
    trackers = check_report_to(args.report_to)

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")),
    )
    if args.validation_prompt and accelerator.distributed_type == DistributedType.FSDP:
        # validation runs on the main process only; a sharded model needs every rank in each forward
        raise ValueError("--validation_prompt is not supported under FSDP (validation runs on one process); "
                         "drop it, or validate the saved LoRA with `qwen-fused edit`")
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2 and fsdp_plugin.mixed_precision_policy is not None:
        # accelerate's FSDP2 policy (param_dtype = --mixed_precision) casts every floating-point input of each
        # block to bf16/fp16, the fused attention's float32 RoPE tables too (its kernels refuse them: stock passes
        # them complex, which FSDP leaves alone). The loss casts the model's inputs itself; blocks pass on
        # activations in the parameters' dtype
        import dataclasses

        fsdp_plugin.mixed_precision_policy = dataclasses.replace(fsdp_plugin.mixed_precision_policy,
                                                                 cast_forward_inputs=False)
    check_output_dir(args, accelerator)
    resume = resolve_resume(args)
    if args.resume_from_checkpoint == "latest" and resume is None:  # as diffusers' scripts do
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet; a new run")
    set_seed(args.seed, device_specific=True)
    weight_dtype = DTYPES[accelerator.mixed_precision]

    pipe = load_pipeline(args.pretrained_model_name_or_path, dtype=weight_dtype)
    variant = edit_variant(pipe)
    if variant != "2.1" and args.validation_prompt and not args.validation_image:  # model_index.json was not at hand
        raise ValueError(VALIDATION_NEEDS_IMAGE)
    if variant == "2.1" and condition_area_given:
        raise ValueError("--condition_area: Qwen-Image 2.1 shows the text encoder the VAE-sized condition images "
                         "(one resize, as its pipeline does); drop the option")
    if variant == "2.1" and args.lora_target_modules == DEFAULT_TARGETS:
        # the option's default is Qwen-Image's list (run.json and resume keep comparing that string); a 2.1 model
        # has none of its double-stream names and trains its own family's default
        from .families import qwenimage21

        targets = list(qwenimage21.LORA_TARGETS)
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
    accelerator.print(run_summary(args, dataset, steps_per_epoch, max_steps, params, compiled, accelerator))
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "func"}, f, indent=1)
        accelerator.init_trackers("qwen-fused-train", config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})

    if variant == "2.1":  # the family's batch layout and the scheduler's shift by sequence length
        from .families.qwenimage21_train import FlowMatching21 as flow_cls
    else:
        flow_cls = FlowMatching
    flow = flow_cls(pipe.scheduler, args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
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
                if args.validation_prompt and step % validation_every == 0 and accelerator.is_main_process:
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
        paths = save_lora_files(state, args.output_dir, args.output_name, merged=not args.no_merged_layout)
        print(f"trained {step} steps; LoRA: {', '.join(paths)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _to(batch, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v] if isinstance(v, list)
                else v) for k, v in batch.items()}


def main(argv=None) -> int:
    parser = ArgumentParser(prog="qwen_fused.train", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
