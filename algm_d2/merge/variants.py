"""The paper's Table 6 ablations of what a merge does with the tokens it groups.

- ``pick_random_members``: a merged token takes the value of one random member instead of the group's average
  (no denoising). The member is drawn with probability proportional to its size, so the draw's expectation is the
  size-weighted average the default takes.
- ``without_reduction``: every token is kept, each member of a group takes the group's value (no attention
  balancing). Groups are formed exactly as in the reduced model: the stages run on the merged layout that the
  state tracks as ``virtual``, and their result is spread back over the full grid.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .state import MergeState, row_sums

Stage = Callable[[Tensor, MergeState], Tuple[Tensor, MergeState]]


def pick_random_members(before: Tensor, state_before: MergeState, after: Tensor, state_after: MergeState,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """``after`` with every patch slot's value replaced by the ``before`` value of one random member.

    Members are found through the grid: cell c belonged to slot ``state_before.index_map[c]`` and now belongs to
    ``state_after.index_map[c]``. Each slot keeps the cell with the highest random key (keys are a random
    permutation, so there are no ties); a member of size s owns s cells, hence probability ∝ size. Prefix and
    padding slots own no cells and keep their values.
    """
    b, n = state_after.index_map.shape
    t = after.shape[1]
    keys = torch.rand(b, n, device=after.device, generator=generator).argsort(dim=1)
    flat = (state_after.index_map + torch.arange(b, device=after.device)[:, None] * t).flatten()
    best = torch.full((b * t,), -1, dtype=keys.dtype, device=after.device)
    best = best.scatter_reduce(0, flat, keys.flatten(), reduce="amax")
    chosen = (keys.flatten() == best[flat]).view(b, n)
    image, cell = chosen.nonzero(as_tuple=True)
    out = after.clone()
    out[image, state_after.index_map[image, cell]] = before[image, state_before.index_map[image, cell]]
    return out


def group_values(x: Tensor, layout: MergeState) -> Tensor:
    """The merged sequence ``[B, T', C]`` of ``layout`` from the full grid sequence ``x`` ``[B, P + H*W, C]``:
    each slot the mean of its cells (their values are equal copies, up to rounding), prefix tokens as they are."""
    b, t = layout.sizes.shape
    p = layout.num_prefix
    flat = (layout.index_map + torch.arange(b, device=x.device)[:, None] * t).flatten()
    sums = row_sums(x[:, p:].flatten(0, 1).float(), flat, b * t).view(b, t, -1)
    values = sums / layout.sizes.float().clamp(min=1.0)[..., None]
    values[:, :p] = x[:, :p].float()
    return values.to(x.dtype)


def without_reduction(x: Tensor, state: MergeState, stage: Stage) -> Tuple[Tensor, MergeState]:
    """Run ``stage`` on the merged layout ``state`` tracks and keep all tokens: ``x`` stays the full grid sequence
    (``state``'s own layout is never merged), each cell taking its new group's value."""
    layout = state.virtual
    merged_in = x if layout is None else group_values(x, layout)
    merged_out, new_layout = stage(merged_in, state if layout is None else layout)
    p = state.num_prefix
    full = torch.cat([merged_out[:, :p], new_layout.unmerge(merged_out)], dim=1)
    return full, dataclasses.replace(state, virtual=new_layout)
