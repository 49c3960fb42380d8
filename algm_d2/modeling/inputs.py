"""Checks of what users hand to a model: detectron2's list of dicts with an ``"image"`` tensor ``[3, H, W]``."""
from __future__ import annotations

from typing import Any

import torch


def check_finite_image(image: Any, name: str, error: type = ValueError) -> None:
    """Raise ``error`` naming the image when a floating-point image has NaN or inf values (uint8 images cannot):
    they would silently give NaN scores, and under ALGM's "min" policy change the other images of the batch."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise error(f"image {name} has {bad} non-finite values (NaN or inf) of {image.numel()}")


def check_image_batch(images: Any, *, channels: int = 3) -> None:
    """ValueError naming the expected shape unless ``images`` is a floating-point tensor ``[B, channels, H, W]``
    with B, H, W >= 1 (shape and type only: no device synchronisation)."""
    expected = f"a float tensor [B, {channels}, H, W] with B, H, W >= 1"
    if not isinstance(images, torch.Tensor):
        hint = " (convert it: torch.as_tensor / torch.stack)" if isinstance(images, (list, tuple)) or hasattr(
            images, "__array__") else ""
        raise ValueError(f"images must be {expected}, got a {type(images).__name__}{hint}")
    shape = tuple(images.shape)
    if images.dim() != 4 or shape[1] != channels:
        hint = " (one image: add the batch dimension, images[None])" if images.dim() == 3 else ""
        raise ValueError(f"images must be {expected}, got shape {shape}{hint}")
    if 0 in shape:
        raise ValueError(f"images must be {expected}, got shape {shape} (an empty batch or a side of 0 pixels)")
    if not images.is_floating_point():
        raise ValueError(f"images must be {expected}, got dtype {images.dtype} (normalize the pixels first)")


def check_batched_inputs(batched_inputs: Any) -> None:
    """ValueError unless ``batched_inputs`` is detectron2's non-empty list of dicts, each with an ``"image"`` tensor
    ``[3, H, W]`` (H, W >= 1), uint8 or float, whose float values are finite; names the image."""
    if not isinstance(batched_inputs, (list, tuple)) or not batched_inputs:
        empty = " (empty)" if isinstance(batched_inputs, (list, tuple)) else ""
        raise ValueError("model inputs must be a non-empty list of dicts with an 'image' tensor [3, H, W], got "
                         f"{type(batched_inputs).__name__}{empty}")
    for index, x in enumerate(batched_inputs):
        name = x.get("file_name", f"{index} of the batch") if isinstance(x, dict) else f"{index} of the batch"
        image = x.get("image") if isinstance(x, dict) else None
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or 0 in image.shape:
            got = (f"shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
                   else f"a {type(image if isinstance(x, dict) else x).__name__}")
            raise ValueError(f"input {name}: 'image' must be a tensor [3, H, W] with H, W >= 1, got {got}")
        check_finite_image(image, name)
