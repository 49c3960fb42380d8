"""ALGM, the method: framework-free functions on ``[B, N, C]`` token sequences plus an explicit merge state.

Imports torch only. Integration with models lives in ``algm_d2.modeling``.
"""
from __future__ import annotations

from .thresholds import CosineSimilarityStats, ThresholdCalibrator
from .clap import local_merge, window_similarity
from .config import OFF, ALGMConfig, FixedLevel, parse_rule
from .gbm import global_merge
from .rules import merge_counts
from .stages import merge_after_attention, stage_function
from .state import MergeState
from .tome import tome_merge
from .variants import pick_random_members, without_reduction

__all__ = [
    "ALGMConfig", "FixedLevel", "OFF", "MergeState", "parse_rule", "local_merge", "global_merge", "window_similarity",
    "merge_counts", "merge_after_attention", "stage_function", "tome_merge", "pick_random_members",
    "without_reduction", "CosineSimilarityStats", "ThresholdCalibrator",
]

