"""CLAP: conditional local average pooling of k×k windows whose tokens are similar (ALGM's first stage)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FixedLevel, Rule
from .rules import fixed_count, merge_counts, merges_nothing, top_rank
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


def local_merge(x: Tensor, state: MergeState, window: Tuple[int, int], rule: Rule, policy: str, layer: int
                ) -> Tuple[Tensor, MergeState]:
    """Merge each selected window into one token (the size-weighted mean of its cells).

    ``x`` is the full sequence ``[B, P + H*W, C]`` of an unmerged state. The order left behind is the release's:
    prefix tokens, then the merged windows by descending similarity, then the other cells in grid order.

    Windows whose scores lie within float32 rounding of each other (near-identical content) may be ordered
    differently than in the release, whose scores are rounded differently (pairwise cosines, explicit attention);
    with exactly equal scores the order is ``topk``'s, as there.
    """
    if state.merged:
        raise ValueError("CLAP (local merging) needs the unmerged grid: run it at or before the first merge")
    h, w = state.grid_size
    kh, kw = window
    if kh > h or kw > w or merges_nothing(rule):
        return x, state  # no full window fits the grid (an extreme aspect ratio), or nothing would merge
    b, t, c = x.shape
    p = state.num_prefix
    cell_window = window_index(state.grid_size, window, x.device)
    in_window = cell_window >= 0
    gather_index = cell_window.clamp(min=0).expand(b, -1)
    if isinstance(rule, FixedLevel):  # the same count for every image, known on the host: no sync
        count = fixed_count((h // kh) * (w // kw), rule)
        counts_host = [count] * b
        counts = torch.full((b,), count, dtype=torch.long, device=x.device)
    scores = window_similarity(x[:, p:].reshape(b, h, w, c), window).flatten(1)
    if not isinstance(rule, FixedLevel):
        counts = merge_counts(scores, None, rule, policy, layer)
        counts_host = counts.tolist()  # the one host sync: topk needs k, and the output length follows from counts
    if max(counts_host) == 0:
        return x, state  # nothing to merge: skip the scatter (the state stays unmerged)
    rank = top_rank(scores, max(counts_host))
    merged_window = rank < counts[:, None]

    cell_merged = merged_window.gather(1, gather_index) & in_window
    unmerged_rank = (~cell_merged).long().cumsum(1) - 1
    dest_cells = torch.where(cell_merged, p + rank.gather(1, gather_index), p + counts[:, None] + unmerged_rank)
    dest = torch.cat([torch.arange(p, device=x.device).expand(b, p), dest_cells], dim=1)

    num_tokens = p + counts + (h * w - kh * kw * counts)
    kept = [p + c + h * w - kh * kw * c for c in counts_host]
    return state.apply(x, dest, num_tokens, max(kept), min(kept) != max(kept), total_tokens=sum(kept))
