"""Flow matching for training, as diffusers' Qwen-Image LoRA script does it
(examples/dreambooth/train_dreambooth_lora_qwen_image.py): timesteps drawn with
`compute_density_for_timestep_sampling` and mapped through the scheduler's own sigma table (shifted as its config
says), `x_t = (1 - sigma) x0 + sigma noise`, target `noise - x0`, `compute_loss_weighting_for_sd3` weights; and the
latent packing of the edit pipelines (the clean condition-image latents follow the noisy target tokens in the image
stream, `img_shapes` one `(1, h, w)` per image; the loss covers the target tokens only)."""
from __future__ import annotations

import torch


def pack(latents):
    """[B, C, 1, H, W] latents -> [B, H/2 * W/2, 4C] tokens (the pipelines' `_pack_latents`)."""
    from diffusers import QwenImageEditPipeline

    b, c, _, h, w = latents.shape
    return QwenImageEditPipeline._pack_latents(latents, b, c, h, w)


class FlowMatching:
    """diffusers' flow-matching timestep sampling, noising and loss weighting, from a scheduler's tables."""

    def __init__(self, scheduler, weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                 dynamic_shift=False):
        fresh = type(scheduler).from_config(scheduler.config)  # tables as constructed (no set_timesteps)
        self.timesteps = fresh.timesteps.float()
        self.sigmas = fresh.sigmas.float()
        self.num_train_timesteps = fresh.config.num_train_timesteps
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        # dynamic_shift (Qwen-Image 2.1): shift the sigmas by the image's sequence length as the pipeline's
        # `set_timesteps(sigmas, mu=calculate_shift(...))` does. Qwen-Image's training keeps the table as it is.
        self.scheduler = fresh if dynamic_shift and fresh.config.use_dynamic_shifting else None

    def sample(self, batch_size, device, image_seq_len=None):
        """(timesteps, sigmas) of `batch_size` samples; with dynamic shifting the sigmas of the unshifted table
        are shifted for `image_seq_len` target tokens (diffusers' pipeline_qwenimage21.py `__call__` step 4:
        `mu = calculate_shift(seq_len, scheduler config)`, then the scheduler's `time_shift(mu, 1.0, sigmas)`,
        timesteps `sigmas * num_train_timesteps`)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, self.logit_mean,
                                                  self.logit_std, self.mode_scale)
        idx = (u * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        if self.scheduler is None:
            return self.timesteps[idx].to(device), self.sigmas[idx].to(device)
        if image_seq_len is None:
            raise ValueError("FlowMatching with dynamic shifting needs the image sequence length")
        sigmas = self.scheduler.time_shift(self.mu(image_seq_len), 1.0, self.sigmas[idx])
        return (sigmas * self.num_train_timesteps).to(device), sigmas.to(device)

    def mu(self, image_seq_len):
        from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

        c = self.scheduler.config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

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
