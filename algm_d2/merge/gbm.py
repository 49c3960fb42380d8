"""GBM: global bipartite merging of tokens whose best match is above a threshold (ALGM's second stage)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FixedLevel, Rule
from .rules import SequenceSizes, descending_rank, fixed_count, merge_counts, merges_nothing
from .state import MergeState


@dataclass(frozen=True)
class GlobalPlan:
    """Which A tokens each image merges into which B token, before any host sync: the ``best`` match score and
    ``best_index`` (into B) of every A token, the real candidates ``a_ok`` / ``b_ok``, the ``counts`` ``[B]`` each
    image merges and the ``num_tokens`` ``[B]`` it then keeps. ``sizes``: the output sizes when the host knows them
    without a sync (a fixed level on an unpadded batch), else None."""

    best: Tensor
    best_index: Tensor
    a_ok: Tensor
    b_ok: Tensor
    counts: Tensor
    num_tokens: Tensor
    sizes: Optional[SequenceSizes] = None


def plan_global_merge(x: Tensor, state: MergeState, rule: Rule, policy: str, layer: int) -> Optional[GlobalPlan]:
    """The first half of :func:`global_merge` (no host sync); None when nothing can merge."""
    b, t, _ = x.shape
    p = state.num_prefix
    if t - p < 2 or merges_nothing(rule):
        return None  # nothing to pair (the release returns early too) or nothing to merge
    device = x.device
    metric = F.normalize(x, dim=-1)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)

    position = torch.arange(t, device=device)
    a_ok, b_ok = (position[0::2] >= p).expand(b, -1), (position[1::2] >= p).expand(b, -1)
    valid = state.valid_mask()
    if valid is not None:
        a_ok, b_ok = a_ok & valid[:, 0::2], b_ok & valid[:, 1::2]

    scores = scores.masked_fill(~b_ok[:, None, :], float("-inf"))
    best, best_index = scores.max(dim=-1)
    best = best.masked_fill(~a_ok, float("-inf"))
    # A fixed level on an unpadded batch: every image has the same candidates, so the count and the output length
    # are known on the host and the stage needs no sync.
    if isinstance(rule, FixedLevel) and not state.padded:
        num_a, num_b = (t + 1) // 2 - (p + 1) // 2, t // 2 - p // 2
        count = fixed_count(num_a, rule)
        counts = torch.full((b,), count, dtype=torch.long, device=device)
        length = p + num_a - count + num_b
        return GlobalPlan(best, best_index, a_ok, b_ok, counts,
                          torch.full((b,), length, dtype=torch.long, device=device), SequenceSizes.uniform(length, b))
    counts = merge_counts(best, a_ok, rule, policy, layer)
    return GlobalPlan(best, best_index, a_ok, b_ok, counts, p + a_ok.sum(1) - counts + b_ok.sum(1))


def apply_global_merge(x: Tensor, state: MergeState, plan: GlobalPlan, sizes: SequenceSizes,
                       seq_len: Optional[int] = None) -> Tuple[Tensor, MergeState]:
    """The second half of :func:`global_merge`: merge as ``plan`` says. ``sizes`` are its output sizes (host ints);
    ``seq_len`` pads the output past the longest image (a CUDA graph's bucket; default: the longest)."""
    b, t, _ = x.shape
    p = state.num_prefix
    device = x.device
    position = torch.arange(t, device=device)
    a_pos, b_pos = position[0::2], position[1::2]
    a_ok, b_ok = plan.a_ok, plan.b_ok
    merged_a = (descending_rank(plan.best) < plan.counts[:, None]) & a_ok
    kept_a = a_ok & ~merged_a

    kept_a_total = kept_a.sum(1, keepdim=True)
    trash = torch.full((), t, device=device)
    dest_b = torch.where(b_ok, p + kept_a_total + b_ok.long().cumsum(1) - 1, trash)
    dest_b = torch.where(b_pos < p, b_pos, dest_b)
    dest_a = torch.where(kept_a, p + kept_a.long().cumsum(1) - 1, trash)
    dest_a = torch.where(merged_a, dest_b.gather(1, plan.best_index), dest_a)
    dest_a = torch.where(a_pos < p, a_pos, dest_a)
    dest = torch.empty(b, t, dtype=torch.long, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = dest_b
    length = sizes.longest if seq_len is None else seq_len
    if length == t and not sizes.padded and not state.padded:
        return state.permute(x, dest)  # nothing merged: only the release's reordering remains
    return state.apply(x, dest, plan.num_tokens, length, sizes.padded or length != sizes.longest,
                       total_tokens=sizes.total)


def global_merge(x: Tensor, state: MergeState, rule: Rule, policy: str, layer: int) -> Tuple[Tensor, MergeState]:
    """Split the sequence alternately into A (even positions) and B (odd), merge A tokens into their best B match.

    As in the release, the split runs over the whole sequence, prefix tokens included, and prefix tokens neither
    merge nor receive merges. Each image merges its best-scoring A tokens (how many: :func:`merge_counts`); several
    A tokens may join one B token. The order left behind is the release's: prefix tokens, unmerged A tokens in A
    order, then every B token in B order. Padding (under ``per_image``) takes part in nothing and is dropped.
    """
    plan = plan_global_merge(x, state, rule, policy, layer)
    if plan is None:
        return x, state
    # the stage's one host sync (thresholds), after the plan is queued (the GPU works while the host waits): the
    # output length, and whether anything merges at all
    return apply_global_merge(x, state, plan, plan.sizes or SequenceSizes.of(plan.num_tokens))
