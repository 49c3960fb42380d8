"""CLAP: conditional local average pooling of k×k windows whose tokens are similar (ALGM's first stage)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FixedLevel, Rule
from .rules import SequenceSizes, fixed_count, merge_counts, merges_nothing, top_rank
from .state import MergeState


def window_similarity(patches: Tensor, window: Tuple[int, int]) -> Tensor:
    """Mean cosine similarity over the ordered pairs i≠j of each full window: ``[B, H, W, C]`` → ``[B, H//kh, W//kw]``.

    Uses Σ_{i≠j} u_i·u_j = ‖Σ u_i‖² − Σ‖u_i‖² on unit vectors u, so no k²×k² matrix is formed. A zero token has
    u = 0 and adds nothing, as the pairwise cosine (which is 0 for it) would. Cells past the last full window
    (when H or W is not a multiple of the window) are not scored.
    """
    b, h, w, c = patches.shape
    kh, kw = window
    gh, gw = h // kh, w // kw
    unit = F.normalize(patches[:, : gh * kh, : gw * kw].float(), dim=-1).reshape(b, gh, kh, gw, kw, c)
    total = unit.sum(dim=(2, 4))
    self_terms = unit.square().sum(dim=(2, 4, 5))
    k2 = kh * kw
    return (total.square().sum(-1) - self_terms) / (k2 * (k2 - 1))


def window_index(grid_size: Tuple[int, int], window: Tuple[int, int], device: torch.device) -> Tensor:
    """``[H*W]`` long: the raster index of the full window each grid cell lies in, or -1 for cells past the border."""
    h, w = grid_size
    kh, kw = window
    gh, gw = h // kh, w // kw
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    index = (rows // kh) * gw + cols // kw
    inside = (rows < gh * kh) & (cols < gw * kw)
    return torch.where(inside, index, torch.full_like(index, -1)).flatten()


@dataclass(frozen=True)
class LocalPlan:
    """Which windows each image merges, before any host sync: window ``scores`` ``[B, windows]``, ``counts`` ``[B]``
    (each image merges its best-scoring ``counts`` windows) and the ``num_tokens`` ``[B]`` each image then keeps.
    ``sizes``: the output sizes when the host knows them without a sync (fixed levels), else None."""

    scores: Tensor
    counts: Tensor
    num_tokens: Tensor
    sizes: Optional[SequenceSizes] = None


def plan_local_merge(x: Tensor, state: MergeState, window: Tuple[int, int], rule: Rule, policy: str, layer: int
                     ) -> Optional[LocalPlan]:
    """The first half of :func:`local_merge` (no host sync); None when no window can merge (none fits the grid, an
    extreme aspect ratio, or the rule merges nothing)."""
    if state.merged:
        raise ValueError("CLAP (local merging) needs the unmerged grid: run it at or before the first merge")
    h, w = state.grid_size
    kh, kw = window
    if kh > h or kw > w or merges_nothing(rule):
        return None
    b, _, c = x.shape
    p = state.num_prefix
    windows = (h // kh) * (w // kw)
    scores = window_similarity(x[:, p:].reshape(b, h, w, c), window).flatten(1)
    sizes = None
    if isinstance(rule, FixedLevel):  # the same count for every image, known on the host: no sync
        count = fixed_count(windows, rule)
        counts = torch.full((b,), count, dtype=torch.long, device=x.device)
        sizes = SequenceSizes.uniform(p + h * w - (kh * kw - 1) * count, b)
    else:
        counts = merge_counts(scores, None, rule, policy, layer)
    return LocalPlan(scores, counts, p + h * w - (kh * kw - 1) * counts, sizes)


def apply_local_merge(x: Tensor, state: MergeState, plan: LocalPlan, window: Tuple[int, int], sizes: SequenceSizes,
                      top_k: Optional[int] = None, seq_len: Optional[int] = None) -> Tuple[Tensor, MergeState]:
    """The second half of :func:`local_merge`: merge the windows ``plan`` selects. ``sizes`` are the plan's output
    sizes (host ints); ``top_k`` bounds the windows ranked (default all: the same ranking, no host value needed);
    ``seq_len`` pads the output past the longest image (a CUDA graph's bucket; default: the longest)."""
    h, w = state.grid_size
    kh, kw = window
    b, _, _ = x.shape
    p = state.num_prefix
    if sizes.shortest == p + h * w:
        return x, state  # nothing to merge: skip the scatter (the state stays unmerged)
    cell_window = window_index(state.grid_size, window, x.device)
    in_window = cell_window >= 0
    gather_index = cell_window.clamp(min=0).expand(b, -1)
    rank = top_rank(plan.scores, plan.scores.shape[1] if top_k is None else top_k)
    counts = plan.counts
    merged_window = rank < counts[:, None]

    cell_merged = merged_window.gather(1, gather_index) & in_window
    unmerged_rank = (~cell_merged).long().cumsum(1) - 1
    dest_cells = torch.where(cell_merged, p + rank.gather(1, gather_index), p + counts[:, None] + unmerged_rank)
    dest = torch.cat([torch.arange(p, device=x.device).expand(b, p), dest_cells], dim=1)
    length = sizes.longest if seq_len is None else seq_len
    return state.apply(x, dest, plan.num_tokens, length, sizes.padded or length != sizes.longest,
                       total_tokens=sizes.total)


def local_merge(x: Tensor, state: MergeState, window: Tuple[int, int], rule: Rule, policy: str, layer: int
                ) -> Tuple[Tensor, MergeState]:
    """Merge each selected window into one token (the size-weighted mean of its cells).

    ``x`` is the full sequence ``[B, P + H*W, C]`` of an unmerged state. The order left behind is the release's:
    prefix tokens, then the merged windows by descending similarity, then the other cells in grid order.

    Windows whose scores lie within float32 rounding of each other (near-identical content) may be ordered
    differently than in the release, whose scores are rounded differently (pairwise cosines, explicit attention);
    with exactly equal scores the order is ``topk``'s, as there.
    """
    plan = plan_local_merge(x, state, window, rule, policy, layer)
    if plan is None:
        return x, state
    # the one host sync (thresholds): topk needs k, and the output length follows from the counts
    sizes = plan.sizes or SequenceSizes.of(plan.num_tokens)
    h, w = state.grid_size
    most = (state.num_prefix + h * w - sizes.shortest) // (window[0] * window[1] - 1)  # the largest count
    return apply_local_merge(x, state, plan, window, sizes, top_k=most)
