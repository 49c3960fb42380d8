"""Bilinear upsampling of class logits fused with the argmax over classes: the evaluation's decode tail.

``F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(1)`` writes and re-reads a
``[B, K, H, W]`` tensor (2.5 GB for 32 images, 150 classes, 512²). The Triton kernel reads the small logits and
writes only the labels: per output pixel it recomputes PyTorch's bilinear value for each class (same source index
and weights, float32, rounded to the logits' dtype as ``interpolate``'s output is) and keeps the first maximum, as
``argmax`` does. NaN logits are not supported (``argmax`` would return the NaN's index).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of the full-resolution logits the reference materialises at once (chunks over the batch).
_REFERENCE_CHUNK_ELEMENTS = 1 << 28


def upsample_argmax_reference(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """The plain expression, a few images at a time so that peak memory stays bounded; identical output."""
    b, k = logits.shape[:2]
    per_image = k * size[0] * size[1]
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // max(per_image, 1))
    return torch.cat([F.interpolate(logits[i:i + step], size=size, mode="bilinear", align_corners=False).argmax(1)
                      for i in range(0, b, step)])


def upsample_argmax(logits: Tensor, size: Tuple[int, int], *, impl: str = "auto") -> Tensor:
    """``argmax_k bilinear_upsample(logits)[k]`` → labels ``[B, H, W]`` (long); ``impl`` "auto" (Triton on CUDA),
    "reference" or "triton"."""
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"upsample_argmax impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    size = (int(size[0]), int(size[1]))
    if impl == "triton" or (impl == "auto" and logits.is_cuda):
        from .upsample_argmax_triton import upsample_argmax_triton  # noqa: PLC0415 - triton only where it runs

        return upsample_argmax_triton(logits, size)
    return upsample_argmax_reference(logits, size)
