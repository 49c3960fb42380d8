"""ALGM, the method: framework-free functions on ``[B, N, C]`` token sequences plus an explicit merge state.

Imports torch only. Integration with models lives in ``algm_d2.modeling``.
"""
from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .calibration import CosineSimilarityStats, ThresholdCalibrator
from .clap import local_merge, window_similarity
from .config import OFF, ALGMConfig, FixedLevel, parse_rule
from .gbm import global_merge
from .rules import merge_counts
from .state import MergeState

__all__ = [
    "ALGMConfig", "FixedLevel", "OFF", "MergeState", "parse_rule", "local_merge", "global_merge", "window_similarity",
    "merge_counts", "merge_after_attention", "CosineSimilarityStats", "ThresholdCalibrator",
]


def merge_after_attention(x: Tensor, state: MergeState, config: ALGMConfig, layer: int) -> Tuple[Tensor, MergeState]:
    """Run the stages ``config`` places at 1-based ``layer`` (CLAP first when both are there); else return as is."""
    if config.local_active and layer == config.local_layer:
        x, state = local_merge(x, state, config.window, config.local_threshold, config.batch_policy, layer)
    if config.global_active and layer == config.global_layer:
        x, state = global_merge(x, state, config.global_threshold, config.batch_policy, layer)
    return x, state
