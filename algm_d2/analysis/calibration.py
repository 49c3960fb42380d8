"""Threshold calibration on a model (paper Sec. 3.3): run the base model and stream per-layer cosine statistics
(:func:`calibrate_thresholds`, with :mod:`algm_d2.merge.thresholds`' arithmetic), then write the result as a config:
a YAML that ``_BASE_``s the calibrated config and sets the thresholds of its CLAP and GBM layers (train and evaluate
with it as with any config)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from ..merge import OFF, MergeState, ThresholdCalibrator
from ..merge.thresholds import layer_thresholds
from ..modeling.backbone.algm_vit import ALGMViT


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


def calibrated_thresholds_for(result: Mapping[str, Any], local_layer: Optional[int], global_layer: Optional[int]
                              ) -> Dict[str, float]:
    """{"LOCAL_THRESHOLD": τ of the local layer, "GLOBAL_THRESHOLD": τ of the global layer} for the layers the
    calibration measured; a configured layer it did not measure raises naming it."""
    layers = layer_thresholds(result)
    values = {}
    for key, layer in (("LOCAL_THRESHOLD", local_layer), ("GLOBAL_THRESHOLD", global_layer)):
        if layer is None:
            continue
        if layer not in layers:
            raise ValueError(f"MODEL.ALGM.{key.split('_')[0]}_LAYER={layer}: the calibration has no threshold for it "
                             f"(it measured layers {sorted(layers)})")
        values[key] = layers[layer]
    return values


def write_calibrated_config(path: str, base_config: str, result: Mapping[str, Any], local_layer: Optional[int],
                            global_layer: Optional[int]) -> Dict[str, float]:
    """Write the YAML at ``path`` (``_BASE_`` relative to it) and return the thresholds it sets."""
    values = calibrated_thresholds_for(result, local_layer, global_layer)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(Path(base_config).resolve(), out.parent.resolve())
    stats = "; ".join(f"layer {layer}: μ {entry['mean']:.4f}, σ {entry['std']:.4f}, {entry['images']} images"
                      for layer, entry in sorted(result["layers"].items(), key=lambda item: int(item[0])))
    body = yaml.safe_dump({"_BASE_": base, "MODEL": {"ALGM": {"ENABLED": True, **values}}}, sort_keys=False)
    out.write_text(f"# ALGM thresholds τ = μ + σ of all-pair token cosines on the base model ({stats}).\n{body}")
    return values
