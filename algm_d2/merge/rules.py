"""How many groups each image merges, from its candidates' scores, a stage rule and the batch policy."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import FixedLevel, Rule


def _masked_mean_std(scores: Tensor, candidates: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-image mean and unbiased std of the candidate scores (torch.std's convention, as the release)."""
    n = candidates.sum(1).to(scores.dtype)
    values = torch.where(candidates, scores, torch.zeros_like(scores))
    mean = values.sum(1) / n.clamp(min=1)
    sq_dev = torch.where(candidates, (scores - mean[:, None]).square(), torch.zeros_like(scores))
    std = (sq_dev.sum(1) / (n - 1).clamp(min=1)).sqrt()
    return mean, std


def merge_counts(scores: Tensor, candidates: Optional[Tensor], rule: Rule, policy: str, layer: int) -> Tensor:
    """Groups to merge per image, ``[B]`` long.

    Args:
        scores: ``[B, M]`` candidate scores (window similarity for CLAP, best-match cosine for GBM).
        candidates: ``[B, M]`` bool of real candidates (None: all are).
        rule: τ (count scores >= τ, the release's comparison), "batch_stats" (τ = mean + std / layer, over the batch
            as the release under "min", per image under "per_image"), or a :class:`FixedLevel`.
        policy: "min" gives every image the batch minimum (each then merges its best groups), "per_image" keeps each
            image's own count.
        layer: the stage's 1-based layer number (divides the std in "batch_stats").
    """
    if candidates is None:
        candidates = torch.ones_like(scores, dtype=torch.bool)
    num_candidates = candidates.sum(1)
    if isinstance(rule, FixedLevel):
        if rule.count is not None:
            counts = num_candidates.clamp(max=rule.count)
        else:
            counts = torch.round(num_candidates.to(torch.float64) * rule.fraction).long()
    elif rule == "batch_stats":
        mean, std = _masked_mean_std(scores.float(), candidates)
        tau = mean + std / layer if policy == "per_image" else (mean.mean() + std.mean() / layer).expand_as(mean)
        counts = ((scores >= tau[:, None].to(scores.dtype)) & candidates).sum(1)
    elif isinstance(rule, float):
        counts = ((scores >= rule) & candidates).sum(1)
    else:
        raise ValueError(f"unknown threshold rule {rule!r}")
    if policy == "min":
        counts = counts.min().expand_as(counts)
    return counts


def descending_rank(scores: Tensor) -> Tensor:
    """Rank of each entry when its row is sorted by descending score (stable: ties keep index order)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def sequence_length(num_tokens: Tensor) -> Tuple[int, bool]:
    """(max tokens, whether images differ) with one host sync."""
    high, low = torch.stack([num_tokens.max(), num_tokens.min()]).tolist()
    return int(high), high != low
