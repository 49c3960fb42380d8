"""How many groups each image merges, from its candidates' scores, a stage rule and the batch policy."""
from __future__ import annotations

from dataclasses import dataclass
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


def fixed_count(num_candidates: int, rule: FixedLevel) -> int:
    """:func:`merge_counts` of a fixed level for images that all have ``num_candidates`` candidates, on the host
    (same arithmetic: Python's and torch's round both round half to even), so the stage needs no host sync."""
    num_candidates = int(num_candidates)  # a traced size (jit tracing for FLOP counts) becomes a plain int
    if rule.count is not None:
        return min(num_candidates, rule.count)
    return round(num_candidates * rule.fraction)


def merges_nothing(rule: Rule) -> bool:
    """Whether a rule merges no group of any image whatever the scores (a fixed level of 0): the stage can skip."""
    return isinstance(rule, FixedLevel) and (rule.count == 0 or rule.fraction == 0)


def ranks_from_order(order: Tensor, size: int) -> Tensor:
    """Invert a per-row ordering of (some of) ``size`` entries: entry ``order[b, j]`` gets rank j, others ``size``."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.full((order.shape[0], size), size, dtype=torch.long, device=order.device).scatter_(1, order, ranks)


def descending_rank(scores: Tensor) -> Tensor:
    """Rank of each entry when its row is sorted by descending score.

    Uses ``argsort(descending=True)`` as the release's GBM does, so equal scores (identical tokens, e.g. saturated
    image regions) are ordered the same way as there on the same device.
    """
    return ranks_from_order(scores.argsort(dim=1, descending=True), scores.shape[1])


def top_rank(scores: Tensor, k: int) -> Tensor:
    """Rank among each row's ``k`` best entries (``k`` or more for the rest), via ``topk`` as the release's CLAP."""
    return ranks_from_order(scores.topk(k, dim=1).indices, scores.shape[1])


@dataclass(frozen=True)
class SequenceSizes:
    """What the host knows of a merge's output: the longest and shortest image (tokens, prefix included) and the
    total. ``padded``: images differ in length."""

    longest: int
    shortest: int
    total: int

    @property
    def padded(self) -> bool:
        return self.longest != self.shortest

    @classmethod
    def uniform(cls, length: int, batch: int) -> "SequenceSizes":
        return cls(length, length, length * batch)

    @classmethod
    def of(cls, num_tokens: Tensor) -> "SequenceSizes":
        """The sizes of ``num_tokens`` ``[B]`` with one host sync."""
        high, low, total = torch.stack([num_tokens.max(), num_tokens.min(), num_tokens.sum()]).tolist()
        return cls(int(high), int(low), int(total))
