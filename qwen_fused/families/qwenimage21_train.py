"""Qwen-Image 2.1 training: encoding one sample and the flow-matching batch, as `QwenImage21Pipeline` builds them at
inference (diffusers 0.42.1, `diffusers/pipelines/qwenimage21/pipeline_qwenimage21.py`).

The recipe, with where each part comes from in that file:
- `QwenImage21Pipeline.__call__` step 1: each condition image is converted to RGBA and resized once; the same
  resized image feeds the text encoder (`image_processor.resize`) and the VAE (`image_processor.preprocess`, the
  VAE reads all four channels). Training sizes come from `data.plan_sample` (sides multiples of 32, the
  pipeline's `vae_scale_factor * 2`); the target image is encoded the same way.
- `encode_prompt` / `_get_qwen_prompt_embeds`: the prompt and the condition images through Qwen3-VL, giving the
  text stream with one slot per 2x2 latent tokens of each condition image, and `image_pad_mask` marking them.
  Text-to-image (a sample without condition images, `image=None`): `is_t2i`, the prompt alone in
  `prompt_template_t2i`, and `image_pad_mask` all False.
- `prepare_latents` / `_encode_vae_image` / `_pack_latents`: VAE latents (mode, normalised by the VAE's
  latents_mean/std), packed as a plain spatial flatten (2.1 has no 2x2 patching).
- the denoising loop: `hidden_states = cat([condition latents, noisy target])` (the target last), `img_shapes`
  one `(1, h, w)` per image in that order, `img_mask = cat([image_pad_mask, ones(n_target // 4)])` (the
  target's slots appended, `append_target_slots`), `timestep = t / 1000`, prediction `noise_pred[:, -n_target:]`.
  Text-to-image: `prepare_latents` gives `image_latents = None` and the loop passes `latents` alone
  (`if input_images_latents is not None`), `img_shapes` holds the target's shape only (`input_image_sizes` is
  empty): the same code here with an empty `edits`.
- step 4: the scheduler shifts sigmas by the target's sequence length, `mu = calculate_shift(n_target, ...)` from
  the scheduler config: `FlowMatching(dynamic_shift=True)` (qwen_fused/flow.py) draws sigmas that way.
The training target is `noise - x0` with `x_t = (1 - s) x0 + s noise` (the scheduler's Euler step integrates
`x0 = x_t - s * pred`), the loss on the target tokens only.

This module sits in the pipelines layer (it uses `qwen_fused.flow` and `qwen_fused.data`); `families/__init__`
does not import it.
"""
from __future__ import annotations

import torch

from .. import data as D
from ..flow import FlowMatching


def pack(latents):
    """[B, C, 1, H, W] latents -> [B, H * W, C] tokens (`QwenImage21Pipeline._pack_latents`)."""
    from diffusers import QwenImage21Pipeline

    b, c, _, h, w = latents.shape
    return QwenImage21Pipeline._pack_latents(latents, b, c, h, w)


def _rgba(img):
    # `__call__` step 1: `img.convert("RGBA")` before both the resize and the VAE preprocessing
    return img if img.mode == "RGBA" else img.convert("RGBA")


@torch.no_grad()
def encode_sample(pipe, record: D.Record, plan: D.Plan, device) -> dict:
    """One sample as the pipeline encodes it: `prompt_embeds` [S, D] and `img_mask` [S] (its condition-image
    slots), the target's and each condition image's VAE latents [C, 1, h, w]."""
    ip = pipe.image_processor

    def latents(img, size):
        w, h = size
        pixels = ip.preprocess(img, height=h, width=w).unsqueeze(2).to(device, pipe.vae.dtype)
        return pipe._encode_vae_image(pixels, generator=None)[0].float().cpu()

    target = _rgba(D.open_rgb(record.image, record.line))
    conditions = [_rgba(D.open_rgb(p, record.line)) for p in record.edit_images]
    vl = [ip.resize(img, width=w, height=h) for img, (w, h) in zip(conditions, plan.edits)]
    # no condition image: `image=None`, as `__call__` passes its `input_images` then; `_get_qwen_prompt_embeds`
    # takes `image is None` as text-to-image (`prompt_template_t2i`, no vision input), while an empty list would
    # still get the image template's one `<|image_pad|>`
    embeds, mask, image_pad_mask = pipe.encode_prompt(prompt=record.prompt, image=vl or None, device=device)
    keep = slice(None) if mask is None else mask[0].bool()
    return {"prompt_embeds": embeds[0][keep].float().cpu(), "img_mask": image_pad_mask[0][keep].bool().cpu(),
            "target": latents(target, plan.target),
            "edits": [latents(img, size) for img, size in zip(conditions, plan.edits)]}


class FlowMatching21(FlowMatching):
    """`FlowMatching` with the 2.1 batch layout (module docstring) and sigmas shifted by the target's length."""

    def __init__(self, scheduler, *args, **kwargs):
        super().__init__(scheduler, *args, dynamic_shift=True, **kwargs)

    def loss(self, transformer, batch, dtype=None, noise=None, timesteps=None, sigmas=None):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        x0 = batch["target"]
        dtype = dtype or x0.dtype
        bsz = x0.shape[0]
        n_target = x0.shape[3] * x0.shape[4]
        if noise is None:
            noise = torch.randn_like(x0)
        if timesteps is None:
            timesteps, sigmas = self.sample(bsz, x0.device, image_seq_len=n_target)
        s = sigmas.to(x0.dtype).view(bsz, 1, 1, 1, 1)
        noisy = (1.0 - s) * x0 + s * noise
        edits = batch["edits"]
        hidden = torch.cat([pack(e) for e in edits] + [pack(noisy)], dim=1)
        img_shapes = [[(1, t.shape[3], t.shape[4]) for t in [*edits, x0]]] * bsz
        img_mask = batch["img_mask"].bool()
        img_mask = torch.cat([img_mask, img_mask.new_ones(bsz, n_target // 4)], dim=1)
        mask = batch["prompt_embeds_mask"]
        pred = transformer(hidden_states=hidden.to(dtype), encoder_hidden_states=batch["prompt_embeds"].to(dtype),
                           encoder_hidden_states_mask=None if mask is None else mask.bool(),
                           timestep=(timesteps / 1000).to(dtype), img_shapes=img_shapes, img_mask=img_mask,
                           return_dict=False)[0]
        pred = pred[:, -n_target:]
        target = pack(noise - x0)
        weighting = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas=sigmas).view(bsz, 1, 1)
        loss = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1).mean()
        return loss, {"timesteps": timesteps, "sigmas": sigmas, "noise": noise}
