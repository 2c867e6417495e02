"""`qwen-fused train` (also `accelerate launch -m qwen_fused.train ...`): LoRA training of Qwen-Image-Edit
(-2509, -2511) and Qwen-Image 2.1 on the fused (merged-QKV) transformer.

The loss is diffusers' Qwen-Image LoRA training loss (examples/dreambooth/train_dreambooth_lora_qwen_image.py):
timesteps drawn with `compute_density_for_timestep_sampling` and mapped through the scheduler's own
sigma table (shifted as its config says), `x_t = (1 - sigma) x0 + sigma noise`, target `noise - x0`,
`compute_loss_weighting_for_sd3` weights; for editing, the clean condition-image latents follow the noisy target
tokens in the image stream exactly as the edit pipelines pack them (`img_shapes` one `(1, h, w)` per image;
-2511's `zero_cond_t` is applied by the transformer) and the loss covers the target tokens only. Qwen-Image 2.1
(`QwenImage21Pipeline`) trains on its own pipeline's batch: the condition images in the text stream and as VAE
latents before the noisy target (or none: text-to-image), sigmas shifted by the target's sequence length as its
scheduler does (qwen_fused/families/qwenimage21_train.py says where each part comes from).

Output folder:
  checkpoint-<step>.safetensors            LoRA, standard layout (to_q/k/v): for diffusers, ComfyUI, `qwen-fused edit`
  checkpoint-<step>-merged.safetensors     the same LoRA, merged layout (to_qkv / add_qkv_proj): this package only
  checkpoint-final[-merged].safetensors    at the end
  state/checkpoint-<step>/                 accelerate state (LoRA, optimizer, lr scheduler, RNG) for resuming
  run.json                                 the arguments of the run that owns the folder

FSDP for full-size training: see `qwen_fused/fsdp_config.yaml`.
"""
from __future__ import annotations

import argparse

from .cli_util import HelpFormatter
from .train_lora import DEFAULT_TARGETS

DESCRIPTION = __doc__


# ----------------------------------------------------------------------------------------------------------
# arguments

def add_arguments(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path",
                   help="diffusers folder or hub id of Qwen-Image-Edit[-2509|-2511] or Qwen-Image 2.1 (found from its "
                        "model_index.json)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: accelerate's config (bf16 on CUDA is the usual choice)")
    g.add_argument("--fp8_base", "--enable_fp8_training", dest="fp8_base", action="store_true",
                   help="store frozen base linear weights as float8_e4m3fn, upcast per use "
                        "(diffusers layerwise casting)")
    g.add_argument("--no_fuse", action="store_true", help="train the stock (unfused) transformer, for comparison")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_base_path", help="folder the metadata's image paths are relative to")
    g.add_argument("--dataset_metadata_path",
                   help="CSV (image, edit_image, prompt) or JSON / JSONL; Qwen-Image 2.1: rows without edit_image "
                        "train text-to-image")
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
                        "to_q,to_k,to_v/add_*_proj: a LoRA each, as stock peft (block-diagonal on to_qkv). Qwen-Image "
                        "2.1 models train to_qkv,to_out.0,img_mlp.proj,img_mlp.gate_layer,img_mlp.out by default")
    g.add_argument("--lora_fused", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a pretrained LoRA (e.g. Lightning) merged into the base weights before training; repeatable")
    g.add_argument("--resume_from_checkpoint", metavar="DIR|latest",
                   help="a state/checkpoint-N folder, or 'latest' in --output_dir (none there yet: a new run)")
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
    g.add_argument("--output_dir", help="default with --demo: <temp>/qwen-fused-demo-output, replaced by each demo")
    g.add_argument("--output_name", default="checkpoint-final",
                   help="file name of the final LoRA: <output_dir>/<name>.safetensors (and <name>-merged)")
    g.add_argument("--overwrite", action="store_true", help="allow an output folder that holds another run")
    g.add_argument("--save_steps", type=int, default=500,
                   help="save the LoRA files and a resumable state every N optimizer steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep only the newest N checkpoints (their LoRA files and states); default: all")
    g.add_argument("--no_merged_layout", action="store_true",
                   help="skip the merged-layout LoRA copies (*-merged.safetensors); the standard-layout files stay")
    g.add_argument("--report_to", default=None, metavar="TRACKER[,TRACKER]",
                   help="log to tensorboard, wandb, ... (accelerate's trackers; logs in <output_dir>/logs); the "
                        "tracker's package must be installed (tensorboard: the train extra)")
    g.add_argument("--validation_image", action="append", default=[],
                   help="condition image(s) for validation (Qwen-Image 2.1 without one: text-to-image)")
    g.add_argument("--validation_prompt", action="append", default=[],
                   help="prompt for --validation_image (Qwen-Image 2.1 without one: text-to-image); repeatable: one "
                        "image each (validation/step-N[-i].png, and to the --report_to trackers)")
    g.add_argument("--validation_steps", type=int, default=None, help="default: --save_steps")
    g.add_argument("--validation_inference_steps", type=int, default=20, help="denoising steps of a validation edit")
    g.add_argument("--demo", action="store_true",
                   help="tiny random Qwen-Image-Edit + synthetic data in a temp folder, a few CPU steps, offline "
                        "(rank, steps, image size and save interval default smaller)")
    g.add_argument("--demo_variant", default="edit", choices=["edit", "2509", "2511", "2.1"],
                   help="the --demo model: Qwen-Image-Edit, -2509, -2511 or Qwen-Image 2.1")
    return p


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="LoRA training of Qwen-Image-Edit on the fused transformer",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run)
    return p


def _run(args):
    from .train import run  # torch, diffusers, accelerate: only for a run, not for --help

    return run(args)


