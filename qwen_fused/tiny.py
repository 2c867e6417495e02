"""Tiny random Qwen-Image-Edit pipelines, built offline, for tests and `--demo` runs.

Same classes as the real checkpoints (stock diffusers pipelines, `QwenImageTransformer2DModel`,
`AutoencoderKLQwenImage`, `Qwen2_5_VLForConditionalGeneration`, `Qwen2Tokenizer`, `Qwen2VLProcessor`), only
small: transformer 2 blocks of 3 heads x 16, VAE z_dim 4, text encoder 2 text + 2 vision layers of width 16,
a byte-level tokenizer whose Qwen special tokens sit at their real ids. Nothing is downloaded.

The one exception is the processor: the stock `Qwen2VLProcessor` needs torchvision (for its video processor),
so the tiny pipelines use `ImageOnlyQwen2VLProcessor`, defined here. A saved tiny pipeline's `model_index.json`
names this module for it, and diffusers imports no module a saved folder names, so load one after importing
this module (`qwen_fused.pipeline.load_pipeline` does that)::

    import qwen_fused.tiny
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path)
"""
from __future__ import annotations

import torch
# diffusers' loader matches a custom component against base classes it looks up by name in the component's
# module, so ProcessorMixin must be importable from here
from transformers import ProcessorMixin, Qwen2VLProcessor  # noqa: F401

from .numerics import random_parameters

VARIANTS = ("edit", "2509", "2511")
# Qwen2 special tokens at their ids in the real vocabulary (the prompt templates use im_start/im_end,
# vision_start/vision_end and image_pad; the text encoder's config points at these ids)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
FIRST_SPECIAL_ID = 151643
VOCAB_SIZE = 152064
# the text encoder's vision tower sees at most this many pixels (Qwen2-VL resizes to 28-pixel multiples)
TINY_VL_MAX_PIXELS = 56 * 56


# the tiny transformer of the tiny pipelines (and the default of `random_transformer`)
TINY_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes (frame, height, width) that sum to `head_dim`: the real model's (16, 56, 56) at 128."""
    return (16, 56, 56) if head_dim == 128 else (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)


def random_transformer(seed: int = 0, *, dtype=torch.float32, device="cpu", **config):
    """A `QwenImageTransformer2DModel` (`TINY_CONFIG` updated by `config`) with random weights, in eval mode.

    The one builder of random transformers for tests, `check`, the benchmarks and the tiny pipelines (2.1's:
    `families/tiny21.py`). Parameters are created on the meta device and drawn by `numerics.random_parameters`
    (every one matters, activations stay O(1), the same seed gives the same weights in every dtype). The RoPE
    tables are plain tensors, built for real.
    """
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights(include_buffers=False):
        model = QwenImageTransformer2DModel(**{**TINY_CONFIG, **config})
    return random_parameters(model, seed, dtype, device).to(device).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    z_dim = 4
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                  latents_std=[1.0] * z_dim)


def tiny_text_encoder(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": VOCAB_SIZE,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=VOCAB_SIZE,
        image_token_id=SPECIAL_TOKENS.index("<|image_pad|>") + FIRST_SPECIAL_ID,
        video_token_id=SPECIAL_TOKENS.index("<|video_pad|>") + FIRST_SPECIAL_ID,
        vision_start_token_id=SPECIAL_TOKENS.index("<|vision_start|>") + FIRST_SPECIAL_ID,
        vision_end_token_id=SPECIAL_TOKENS.index("<|vision_end|>") + FIRST_SPECIAL_ID,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_tokenizer():
    """Byte-level `Qwen2Tokenizer` (no merges: one token per UTF-8 byte) with Qwen's special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    vocab.update({tok: FIRST_SPECIAL_ID + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` with no video processor (the stock one needs torchvision): images and text only.

    Module-level so that a saved tiny pipeline records `["qwen_fused.tiny", "ImageOnlyQwen2VLProcessor"]` in
    its `model_index.json` and the stock `DiffusionPipeline.from_pretrained` loads it back in a process that
    imported this module (see the module docstring).
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def tiny_processor(tokenizer=None):
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=TINY_VL_MAX_PIXELS)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer or tiny_tokenizer())


def tiny_edit_pipeline(seed: int = 0, variant: str = "edit"):
    """A stock `QwenImageEditPipeline` ("edit") or `QwenImageEditPlusPipeline` ("2509", "2511", the latter with
    `zero_cond_t`) with tiny random components, fp32 on CPU. Same seed -> same weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny pipeline variant {variant!r}; choose one of {VARIANTS}")
    tokenizer = tiny_tokenizer()
    components = dict(
        transformer=random_transformer(seed, zero_cond_t=variant == "2511"),
        vae=tiny_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tokenizer,
        processor=tiny_processor(tokenizer),
    )
    cls = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path, seed: int = 0, variant: str = "edit"):
    """Build `tiny_edit_pipeline(seed, variant)` and `save_pretrained` it to `path`, a folder the stock
    `DiffusionPipeline.from_pretrained(path)` loads offline once this module is imported (module docstring).
    Returns the in-memory pipeline."""
    pipe = tiny_edit_pipeline(seed, variant)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe
