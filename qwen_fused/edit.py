"""`qwen-fused edit`: image editing with diffusers' Qwen-Image-Edit pipelines, fused attention on by default."""
from __future__ import annotations

import types

STOCK_AREA = 1024 * 1024  # the pixel area the stock edit pipelines resize the (VAE) condition image to


def call_pipeline(pipe, *, area: int | None = None, condition_area: int | None = None, **kwargs):
    """Call a stock `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` with other target areas.

    The stock `__call__` resizes each condition image to a fixed `1024 * 1024` pixel area (aspect kept,
    sides snapped to 32) before the VAE, and -2509/-2511 to `384 * 384` for the text encoder; that area also
    sets the default output size. `area` / `condition_area` replace those constants. This runs the stock
    `__call__` code itself, with a private copy of its module globals in which only those constants differ:
    nothing in diffusers is modified and no pipeline code is copied. Without either argument this is exactly
    `pipe(**kwargs)`.
    """
    if area is None and condition_area is None:
        return pipe(**kwargs)
    stock_call = type(pipe).__call__
    raw = getattr(stock_call, "__wrapped__", stock_call)  # under @torch.no_grad()
    env = dict(raw.__globals__)
    if "calculate_dimensions" not in env:
        raise TypeError(f"{type(pipe).__name__} is not a Qwen-Image-Edit pipeline; cannot change its areas")
    if area is not None:
        stock_dims = env["calculate_dimensions"]

        def calculate_dimensions(target_area, ratio):
            return stock_dims(area if target_area == STOCK_AREA else target_area, ratio)

        env["calculate_dimensions"] = calculate_dimensions
    if condition_area is not None and "CONDITION_IMAGE_SIZE" in env:
        env["CONDITION_IMAGE_SIZE"] = condition_area
    call = types.FunctionType(raw.__code__, env, raw.__name__, raw.__defaults__, raw.__closure__)
    call.__kwdefaults__ = raw.__kwdefaults__
    import torch

    with torch.no_grad():
        return call(pipe, **kwargs)
