"""Threshold calibration on a model (paper Sec. 3.3): run the base model, stream per-layer cosine statistics."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ..merge import OFF, MergeState, ThresholdCalibrator
from .backbone.algm_vit import ALGMViT


@torch.no_grad()
def calibrate_thresholds(encoder: ALGMViT, batches: Iterable[Tensor], layers: Sequence[int], *,
                         max_images: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """τ = μ + σ of the all-pair cosine similarities of patch tokens after each listed layer's attention.

    Args:
        encoder: the backbone; it runs without merging whatever its config says (the paper calibrates the base
            model).
        batches: normalized image batches ``[B, 3, H, W]`` (H, W multiples of the patch size), e.g. training crops.
        layers: 1-based layers to calibrate (ALGM's local and global layers).
        max_images: stop after this many images.
    Returns JSON-serialisable ``{"layers": {"1": {"mean", "std", "threshold", "pairs", "images"}, ...}}``.
    """
    calibrator = ThresholdCalibrator(layers)
    depth = encoder.depth
    for layer in calibrator.stats:
        if not 1 <= layer <= depth:
            raise ValueError(f"calibration layer {layer} is out of range for a model with {depth} blocks")
    last_layer = max(calibrator.stats)
    was_training = encoder.training
    encoder.eval()

    def observe(layer: int, tokens: Tensor, state: MergeState) -> None:
        if layer <= last_layer:
            calibrator.observe(layer, tokens[:, state.num_prefix:], state.valid_mask())

    seen = 0
    try:
        with tqdm(total=max_images, desc="calibrating thresholds", unit="img", disable=not progress) as bar:
            for images in batches:
                if max_images is not None and seen >= max_images:
                    break
                if max_images is not None:
                    images = images[: max_images - seen]
                device = next(encoder.parameters()).device
                encoder(images.to(device), observer=observe, algm=OFF)
                seen += images.shape[0]
                bar.update(images.shape[0])
    finally:
        encoder.train(was_training)
    return calibrator.result()
