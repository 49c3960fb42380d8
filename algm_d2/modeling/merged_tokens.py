"""What a decoder on ALGM's merged patch tokens needs from their merge state: the attention key bias and the way
back to the patch grid (prefix tokens removed in both)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..merge import MergeState


def patch_key_bias(state: MergeState, prop_attn: bool, dtype: torch.dtype) -> Optional[Tensor]:
    """:meth:`MergeState.attention_bias` of the patch tokens ``[B, 1, 1, T - P]`` (log(size) with ``prop_attn``,
    -inf on padding slots), or None when neither applies."""
    bias = state.attention_bias(prop_attn, dtype)
    return None if bias is None else bias[..., state.num_prefix:]


def patches_to_grid(per_token: Tensor, state: MergeState) -> Tensor:
    """Per-token features of the (merged) patch tokens ``[B, T - P, D]`` → the patch grid ``[B, D, h, w]`` (each
    cell takes its token's features)."""
    cells = state.unmerge_patches(per_token) if state.merged else per_token
    h, w = state.grid_size
    return cells.transpose(1, 2).reshape(per_token.shape[0], per_token.shape[-1], h, w)
