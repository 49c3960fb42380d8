"""Threshold calibration (paper Sec. 3.3): τ = μ + σ of all-pair token cosine similarities, streamed per layer.

With unit rows U (N×C): Σ_{i,j} cos = ‖Σ_i u_i‖² and Σ_{i,j} cos² = ‖UᵀU‖_F² (a C×C Gram matrix); the N diagonal
terms are subtracted, so the statistics over ordered pairs i≠j are exact without forming any N×N matrix.

:meth:`ThresholdCalibrator.result` is the calibration file's content (``tools/calibrate_thresholds.py`` saves it as
JSON); :func:`layer_thresholds` and :func:`read_layer_thresholds` read it back.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class CosineSimilarityStats:
    """Running mean and (population) std of cos(u_i, u_j) over the ordered pairs i≠j of every image seen."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.sum_sq = 0.0
        self.pairs = 0
        self.images = 0

    def update(self, tokens: Tensor, valid: Optional[Tensor] = None) -> None:
        """Add a batch ``[B, N, C]`` of images' tokens (``valid`` ``[B, N]`` marks real tokens, None = all)."""
        unit = F.normalize(tokens.detach().double(), dim=-1)
        if valid is not None:
            unit = unit * valid[..., None]
            counts = valid.sum(1).double()
        else:
            counts = torch.full((unit.shape[0],), float(unit.shape[1]), dtype=torch.float64, device=unit.device)
        self_norms = unit.square().sum(-1)
        sum_cos = unit.sum(1).square().sum(-1) - self_norms.sum(1)
        gram = unit.transpose(1, 2) @ unit
        sum_cos_sq = gram.square().sum(dim=(1, 2)) - self_norms.square().sum(1)
        self.sum += float(sum_cos.sum())
        self.sum_sq += float(sum_cos_sq.sum())
        self.pairs += int((counts * (counts - 1)).sum())
        self.images += unit.shape[0]

    def result(self) -> Dict[str, float]:
        if self.pairs == 0:
            raise ValueError("no token pairs were seen: calibrate on at least one image with two tokens")
        mean = self.sum / self.pairs
        std = math.sqrt(max(self.sum_sq / self.pairs - mean * mean, 0.0))
        return {"mean": mean, "std": std, "threshold": mean + std, "pairs": self.pairs, "images": self.images}


class ThresholdCalibrator:
    """One :class:`CosineSimilarityStats` per (1-based) layer; :meth:`result` is JSON-serialisable."""

    def __init__(self, layers: Iterable[int]) -> None:
        self.stats = {int(layer): CosineSimilarityStats() for layer in layers}
        if not self.stats:
            raise ValueError("ThresholdCalibrator needs at least one layer")

    def observe(self, layer: int, patch_tokens: Tensor, valid: Optional[Tensor] = None) -> None:
        if layer in self.stats:
            self.stats[layer].update(patch_tokens, valid)

    def result(self) -> Dict[str, Dict[str, Dict[str, float]]]:
        return {"layers": {str(layer): s.result() for layer, s in sorted(self.stats.items())}}


def layer_thresholds(result: Mapping[str, Any]) -> Dict[int, float]:
    """{1-based layer: τ} of a :meth:`ThresholdCalibrator.result`; ValueError when it does not have that layout."""
    try:
        return {int(layer): float(entry["threshold"]) for layer, entry in result["layers"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f'not a calibration result ({{"layers": {{"<layer>": {{"threshold": τ, ...}}}}}}): '
                         f"{type(err).__name__}: {err}") from None


def read_layer_thresholds(path: str) -> Dict[int, float]:
    """{1-based layer: τ} of a calibration JSON file; ValueError naming ``path`` when it cannot be read."""
    try:
        with open(path) as f:
            return layer_thresholds(json.load(f))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read per-layer thresholds from {path}: {err}") from None
