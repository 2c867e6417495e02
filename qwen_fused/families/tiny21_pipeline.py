"""A tiny random `QwenImage21Pipeline`, built offline, for tests and `--demo 2.1` runs.

Same classes as the real checkpoint (the stock pipeline, `QwenImage21Transformer2DModel`, `AutoencoderKLQwenImage21`
with 64 latent channels and 16x spatial compression, `Qwen3VLForConditionalGeneration`), only small: the transformer
of `tiny21.random_transformer` at 64 channels, a VAE of width 8, a Qwen3-VL text encoder of 2 text + 2 vision layers
of width 16, the byte-level tokenizer of `qwen_fused.tiny` (Qwen's special tokens sit at the same ids in Qwen3-VL).

As for the Qwen-Image tiny pipelines, the processor is an image-only subclass, `ImageOnlyQwen3VLProcessor` (the
stock `Qwen3VLProcessor` needs torchvision for its video processor); a saved tiny 2.1 pipeline loads after this
module is imported (`qwen_fused.pipeline.load_pipeline` does that).

This module sits in the pipelines layer (it uses `qwen_fused.tiny`'s tokenizer); `families/__init__` does not
import it.
"""
from __future__ import annotations

import torch
# diffusers' loader matches a custom component against base classes it looks up by name in the component's
# module, so ProcessorMixin must be importable from here
from transformers import ProcessorMixin, Qwen3VLProcessor  # noqa: F401

from .tiny21 import random_transformer

LATENT_CHANNELS = 64  # the real VAE's z_dim; the transformer's in/out channels follow it
TEXT_WIDTH = 16
# the largest image the text encoder's processor leaves unresized (Qwen3-VL: 16-pixel patches, 2x2 merged): the
# pipeline needs one text-stream slot per 2x2 latent tokens, so the processor must see the VAE's size unchanged
TINY_VL_MAX_PIXELS = 1024 * 1024
# what `QwenImage21Pipeline.__init__` tokenizes to find how many system tokens to drop: the Qwen3-VL chat
# template's rendering of a system message with one text part
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` with no video processor (the stock one needs torchvision): images and text only.
    Module-level so that a saved tiny pipeline's `model_index.json` names it (see the module docstring)."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def tiny_vae(seed: int = 0):
    """`AutoencoderKLQwenImage21`, 64 latent channels, 4 spatial downsamplings (16x, as the pipeline assumes)."""
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1, 1],
                                    num_res_blocks=1, temperal_downsample=[False] * 4,
                                    latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS)


def tiny_text_encoder(seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from ..tiny import FIRST_SPECIAL_ID, SPECIAL_TOKENS, VOCAB_SIZE

    def token_id(tok):
        return SPECIAL_TOKENS.index(tok) + FIRST_SPECIAL_ID

    config = Qwen3VLConfig(
        text_config={
            "hidden_size": TEXT_WIDTH, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 8, "vocab_size": VOCAB_SIZE,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True},
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": TEXT_WIDTH, "patch_size": 16, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "deepstack_visual_indexes": [1], "num_position_embeddings": 64},
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_processor():
    from transformers import Qwen2VLImageProcessorPil

    from ..tiny import tiny_tokenizer

    # Qwen3-VL's image processor: 16-pixel patches, 2x2 merge, mean/std 0.5
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                               min_pixels=32 * 32, max_pixels=TINY_VL_MAX_PIXELS,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ImageOnlyQwen3VLProcessor(image_processor, tiny_tokenizer(), chat_template=CHAT_TEMPLATE)


def tiny_pipeline(seed: int = 0):
    """A stock `QwenImage21Pipeline` with tiny random components, fp32 on CPU. Same seed -> same weights. Its
    scheduler shifts by sequence length (`use_dynamic_shifting`, the pipeline's `calculate_shift` constants), as
    the pipeline's `mu` expects."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096,
                                                  time_shift_type="exponential"),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        processor=tiny_processor(),
        transformer=random_transformer(seed, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                       context_in_dim=TEXT_WIDTH),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path, seed: int = 0):
    """Build `tiny_pipeline(seed)` and `save_pretrained` it to `path` (loads offline once this module is
    imported). Returns the in-memory pipeline."""
    pipe = tiny_pipeline(seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe
