"""Figure 2: mean cosine similarity of intra-class and inter-class token pairs, (a) inside k×k windows after the
local layer, (b) over the whole image after the attention of every layer.

A patch's class is the most frequent label of its pixels (patches that are mostly "ignore" take no part). Means
are over all ordered pairs i≠j of the data set (pair-weighted). Sums come from per-class vector sums, no pair
matrix: for unit vectors, Σ_{i≠j∈c} u_i·u_j = ‖Σ_{i∈c} u_i‖² − Σ_{i∈c} ‖u_i‖².
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..merge import OFF, MergeState
from ..merge.clap import window_index


def patch_labels(labels: Tensor, patch: int, ignore_label: int) -> Tensor:
    """``[B, H, W]`` pixel labels → ``[B, H/p, W/p]`` patch classes (most frequent label; -1 where that is ignore)."""
    b, h, w = labels.shape
    cells = labels.reshape(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).flatten(3)
    mode = cells.mode(dim=-1).values
    return torch.where(mode == ignore_label, torch.full_like(mode, -1), mode)


def class_pair_sums(tokens: Tensor, labels: Tensor, groups: Tensor) -> Tuple[float, int, float, int]:
    """(Σ cos, pairs) of intra-class and of inter-class ordered pairs i≠j inside each group, for one image.

    ``tokens`` ``[N, C]``; ``labels`` ``[N]`` (-1: left out); ``groups`` ``[N]`` (window id, -1: left out).
    """
    keep = (labels >= 0) & (groups >= 0)
    unit = F.normalize(tokens[keep].double(), dim=-1)
    if unit.shape[0] < 2:
        return 0.0, 0, 0.0, 0
    num_classes = int(labels.max()) + 1
    keys, inverse = torch.unique(groups[keep] * num_classes + labels[keep], return_inverse=True)
    class_sums = unit.new_zeros(len(keys), unit.shape[1]).index_add_(0, inverse, unit)
    class_counts = torch.bincount(inverse, minlength=len(keys)).double()
    window_of_key = torch.unique(keys // num_classes, return_inverse=True)[1]
    window_sums = unit.new_zeros(int(window_of_key.max()) + 1, unit.shape[1]).index_add_(0, window_of_key, class_sums)
    window_counts = unit.new_zeros(window_sums.shape[0]).index_add_(0, window_of_key, class_counts)
    self_terms = unit.square().sum()
    intra = class_sums.square().sum() - self_terms
    total = window_sums.square().sum() - self_terms
    intra_pairs = (class_counts * (class_counts - 1)).sum()
    all_pairs = (window_counts * (window_counts - 1)).sum()
    return float(intra), int(intra_pairs), float(total - intra), int(all_pairs - intra_pairs)


class ClassPairSimilarity:
    """Running intra-/inter-class cosine sums and pair counts; :meth:`result` gives the means."""

    def __init__(self) -> None:
        self.sums = [0.0, 0, 0.0, 0]

    def update(self, tokens: Tensor, labels: Tensor, groups: Tensor) -> None:
        """``tokens`` ``[B, N, C]``, ``labels`` and ``groups`` ``[B, N]``."""
        for b in range(tokens.shape[0]):
            for i, value in enumerate(class_pair_sums(tokens[b], labels[b], groups[b])):
                self.sums[i] += value

    def result(self) -> Dict[str, Any]:
        intra, intra_pairs, inter, inter_pairs = self.sums
        return {"intra_class": intra / intra_pairs if intra_pairs else None, "intra_pairs": intra_pairs,
                "inter_class": inter / inter_pairs if inter_pairs else None, "inter_pairs": inter_pairs}


@torch.no_grad()
def analyze_similarity(encoder: torch.nn.Module, batches: Iterable[Tuple[Tensor, Tensor]], *,
                       window_sizes: Sequence[int] = (2, 4, 8, 16, 32), window_layer: int = 1, ignore_label: int = 255,
                       progress: bool = True) -> Dict[str, Any]:
    """Run the base model (merging off) on ``batches`` of (normalized images, pixel labels) and measure
    Fig. 2a at ``window_layer`` for each k in ``window_sizes`` (k larger than the grid is skipped) and Fig. 2b at
    every layer. Returns ``{"windows": {k: stats}, "layers": {layer: stats}, "window_layer", "images"}``."""
    patch = encoder.patch_size[0]
    windows: Dict[int, ClassPairSimilarity] = {}
    layers: Dict[int, ClassPairSimilarity] = {}
    seen = 0
    for images, labels in tqdm(batches, desc="token similarity", unit="batch", disable=not progress):
        cell_labels = patch_labels(labels, patch, ignore_label).flatten(1)

        def observe(layer: int, tokens: Tensor, state: MergeState) -> None:
            patches = tokens[:, state.num_prefix:]
            whole = torch.zeros_like(cell_labels)
            layers.setdefault(layer, ClassPairSimilarity()).update(patches, cell_labels, whole)
            if layer != window_layer:
                return
            h, w = state.grid_size
            for k in window_sizes:
                if k <= min(h, w):
                    cells = window_index((h, w), (k, k), tokens.device).expand_as(cell_labels)
                    windows.setdefault(k, ClassPairSimilarity()).update(patches, cell_labels, cells)

        encoder(images, observer=observe, algm=OFF)
        seen += images.shape[0]
    return {"windows": {k: s.result() for k, s in sorted(windows.items())},
            "layers": {layer: s.result() for layer, s in sorted(layers.items())},
            "window_layer": window_layer, "images": seen}
