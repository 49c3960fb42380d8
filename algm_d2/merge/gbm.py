"""GBM: global bipartite merging of tokens whose best match is above a threshold (ALGM's second stage)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FixedLevel, Rule
from .rules import descending_rank, fixed_count, merge_counts, merges_nothing, sequence_length
from .state import MergeState


def global_merge(x: Tensor, state: MergeState, rule: Rule, policy: str, layer: int) -> Tuple[Tensor, MergeState]:
    """Split the sequence alternately into A (even positions) and B (odd), merge A tokens into their best B match.

    As in the release, the split runs over the whole sequence, prefix tokens included, and prefix tokens neither
    merge nor receive merges. Each image merges its best-scoring A tokens (how many: :func:`merge_counts`); several
    A tokens may join one B token. The order left behind is the release's: prefix tokens, unmerged A tokens in A
    order, then every B token in B order. Padding (under ``per_image``) takes part in nothing and is dropped.
    """
    b, t, _ = x.shape
    p = state.num_prefix
    if t - p < 2 or merges_nothing(rule):
        return x, state  # nothing to pair (the release returns early too) or nothing to merge
    # A fixed level on an unpadded batch: every image has the same candidates, so the count and the output length
    # are known on the host and the stage needs no sync.
    uniform = isinstance(rule, FixedLevel) and not state.padded
    if uniform:
        num_a, num_b = (t + 1) // 2 - (p + 1) // 2, t // 2 - p // 2
        count = fixed_count(num_a, rule)
    device = x.device
    metric = F.normalize(x, dim=-1)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)

    position = torch.arange(t, device=device)
    a_pos, b_pos = position[0::2], position[1::2]
    a_ok, b_ok = (a_pos >= p).expand(b, -1), (b_pos >= p).expand(b, -1)
    valid = state.valid_mask()
    if valid is not None:
        a_ok, b_ok = a_ok & valid[:, 0::2], b_ok & valid[:, 1::2]

    scores = scores.masked_fill(~b_ok[:, None, :], float("-inf"))
    best, best_index = scores.max(dim=-1)
    best = best.masked_fill(~a_ok, float("-inf"))
    if uniform:
        counts = torch.full((b,), count, dtype=torch.long, device=device)
    else:
        counts = merge_counts(best, a_ok, rule, policy, layer)
    merged_a = (descending_rank(best) < counts[:, None]) & a_ok
    kept_a = a_ok & ~merged_a

    kept_a_total = kept_a.sum(1, keepdim=True)
    trash = torch.full((), t, device=device)
    dest_b = torch.where(b_ok, p + kept_a_total + b_ok.long().cumsum(1) - 1, trash)
    dest_b = torch.where(b_pos < p, b_pos, dest_b)
    dest_a = torch.where(kept_a, p + kept_a.long().cumsum(1) - 1, trash)
    dest_a = torch.where(merged_a, dest_b.gather(1, best_index), dest_a)
    dest_a = torch.where(a_pos < p, a_pos, dest_a)
    dest = torch.empty(b, t, dtype=torch.long, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = dest_b
    if uniform:
        seq_len, padded = p + num_a - count + num_b, False
        num_tokens, total = torch.full((b,), seq_len, dtype=torch.long, device=device), b * seq_len
    else:
        num_tokens = p + a_ok.sum(1) - counts + b_ok.sum(1)
        # The stage's one host sync, after the plan is queued (the GPU works while the host waits): the output
        # length, and whether anything merges at all.
        seq_len, padded, total = sequence_length(num_tokens)
    if seq_len == t and not padded and not state.padded:
        return state.permute(x, dest)  # nothing merged: only the release's reordering remains
    return state.apply(x, dest, num_tokens, seq_len, padded, total_tokens=total)
