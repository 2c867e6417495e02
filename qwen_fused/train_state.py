"""A training run's folder and state: the output-folder checks, resuming (and whether a checkpoint fits the
run's model settings), and checkpoints: the LoRA files in both layouts plus accelerate's resumable state."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import torch

from .atomic import atomic_output
from .pipeline import parse_lora_spec
from .train_lora import lora_targets


def first_missing_folder(path):
    """The outermost folder of `path` that does not exist yet (what `os.makedirs(path)` would make first)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def remove_made_folder(made, keep=None) -> int:
    """Remove the folder `made` (a run made it and stopped before training: nothing in it is a result), except
    the folder `keep` when it lies inside and holds files (the cache of encoded samples, reusable work).
    Returns the number of files kept."""
    made = os.path.abspath(made)
    keep = os.path.abspath(keep) if keep else None
    kept = len(os.listdir(keep)) if keep and keep.startswith(made + os.sep) and os.path.isdir(keep) else 0
    if not kept:
        shutil.rmtree(made, ignore_errors=True)
        return 0

    def prune(folder):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if path == keep:
                continue
            if keep.startswith(path + os.sep):
                prune(path)
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)

    prune(made)
    return kept


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
            theirs = sorted(f for f in os.listdir(args.output_dir) if f.startswith("checkpoint-")
                            and f.endswith(".safetensors")) if os.path.isdir(args.output_dir) else []
            if theirs:  # a new run would overwrite them
                raise ValueError(f"--resume_from_checkpoint latest: no state/checkpoint-N folder in {args.output_dir}, "
                                 f"which holds LoRA files ({', '.join(theirs[:3])}); nothing to resume from")
            return None  # nothing saved yet: a new run, as diffusers' scripts do
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


def lora_state(transformer, with_alpha=False) -> dict:
    """The trainable LoRA ("default") as a peft-keyed state dict on CPU, from `qwen_fused.lora.lora_from_model`.
    FSDP shards (DTensor) are gathered, so under FSDP every process must call this. `with_alpha` adds
    `<module>.alpha` keys (what the LoRA files carry)."""
    from .lora import lora_from_model

    def whole(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()

    modules = lora_from_model(transformer)
    state = {}
    for name, f in modules.items():
        state[f"{name}.lora_A.weight"] = whole(f.a)
        state[f"{name}.lora_B.weight"] = whole(f.b)
        if f.bias is not None:
            state[f"{name}.lora_B.bias"] = whole(f.bias)
    if with_alpha:
        for name, f in modules.items():
            state[f"{name}.alpha"] = torch.tensor(float(f.alpha))
    return state


def set_lora_state(transformer, state):
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"checkpoint LoRA does not fit this model: unexpected keys {unexpected[:5]}")


MERGED_SUFFIX = "-merged"  # the merged-layout copy of a LoRA file; the plain name is the standard layout


def save_lora_files(state, output_dir, name, merged=True):
    """`<name>.safetensors` in the standard layout (to_q/k/v: what stock diffusers, ComfyUI and this package all
    read) and `<name>-merged.safetensors` in the merged layout (to_qkv / add_qkv_proj: this package only; stock
    diffusers would load it without the q/k/v part, so it never gets the plain name), from
    `lora_state(..., with_alpha=True)`, each written atomically (diffusers keys and metadata)."""
    from .lora import save_lora

    paths = [os.path.join(output_dir, f"{name}.safetensors")]
    save_lora(state, paths[0], to="standard", overwrite=True)
    if merged:
        paths.append(os.path.join(output_dir, f"{name}{MERGED_SUFFIX}.safetensors"))
        save_lora(state, paths[1], to="merged", overwrite=True)
    return paths


def save_checkpoint(accelerator, transformer, args, step, epoch, name=None):
    """LoRA files plus the accelerate state under state/checkpoint-<step>. The state goes to a temp folder (the
    main process's `atomic_output`, its path shared with every process, each of which writes its part) that
    takes the final name once all parts are in."""
    name = name or f"checkpoint-{step}"
    final = os.path.join(args.output_dir, "state", f"checkpoint-{step}")
    main = accelerator.is_main_process
    if main:
        os.makedirs(os.path.dirname(final), exist_ok=True)
    with atomic_output(final, overwrite=True, folder=True) if main else contextlib.nullcontext() as tmp:
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            tmp = broadcast_object_list([tmp])[0]
        accelerator.save_state(tmp)
        state = lora_state(accelerator.unwrap_model(transformer), with_alpha=True)
        accelerator.wait_for_everyone()  # save_state returns without a barrier: every process's files must be in tmp
        if main:
            with open(os.path.join(tmp, "train_state.json"), "w") as f:
                json.dump({"step": step, "epoch": epoch}, f)
    if main:
        save_lora_files(state, args.output_dir, name, merged=not args.no_merged_layout)
        if args.checkpoints_total_limit:
            remove_old_checkpoints(args.output_dir, args.checkpoints_total_limit, step)
    accelerator.wait_for_everyone()
    return final


def remove_old_checkpoints(output_dir, limit, saved):
    """--checkpoints_total_limit: keep `limit` checkpoints, the one just `saved` (a step number) and the newest
    others, each its state folder and its LoRA files (the merged copy too, and the `-standard` copy of folders
    written when the plain name was the merged layout); the final LoRA is not a checkpoint."""
    folder = os.path.join(output_dir, "state")
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(folder)
                   if d.startswith("checkpoint-") and d.split("-")[1].isdigit() and int(d.split("-")[1]) != saved)
    for step in steps[:len(steps) - (limit - 1)]:
        shutil.rmtree(os.path.join(folder, f"checkpoint-{step}"), ignore_errors=True)
        for suffix in ("", MERGED_SUFFIX, "-standard"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(output_dir, f"checkpoint-{step}{suffix}.safetensors"))
