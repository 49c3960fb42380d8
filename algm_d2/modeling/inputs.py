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
