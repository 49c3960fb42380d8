"""The paper's analyses (Figures 2, 4, 5, the τ calibration's config) and the demo's drawing, for the thin command
lines in ``tools/``. Each analysis returns JSON-serialisable results; ``plots`` draws them (matplotlib, Agg)."""
from .common import labelled_batches, setup_model
from .similarity import ClassPairSimilarity, analyze_similarity, class_pair_sums, patch_labels
from .sweep import algm_star, sweep_thresholds
from .visualize import merge_groups, states_after_merges

__all__ = [
    "setup_model", "labelled_batches", "ClassPairSimilarity", "analyze_similarity", "class_pair_sums",
    "patch_labels", "sweep_thresholds", "algm_star", "merge_groups", "states_after_merges",
]
