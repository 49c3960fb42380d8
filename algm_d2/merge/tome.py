"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching that merges a fixed number r of tokens per layer.

The paper's comparison baseline. It is GBM's matching with a fixed count instead of a threshold, applied after the
attention of every layer (or chosen ones), with size-weighted averages; proportional attention comes from the
state's sizes (``ALGMConfig.prop_attn``). One difference from ToMe's release: the similarity is computed on the
block's hidden tokens after the attention residual (what ALGM compares), not on the attention keys averaged over
heads, which the merge layer does not see.
"""
from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .config import FixedLevel
from .gbm import global_merge
from .state import MergeState


def tome_count(num_tokens: int, num_prefix: int, r: int) -> int:
    """ToMe's clamp: at most half of the non-prefix tokens merge in one layer, ``min(r, (T - P) // 2)``."""
    return max(0, min(r, (num_tokens - num_prefix) // 2))


def tome_merge(x: Tensor, state: MergeState, r: int, policy: str, layer: int) -> Tuple[Tensor, MergeState]:
    """Merge the ``r`` A tokens (even positions) with the highest best-match cosine into their B match (odd).

    Order left behind, as ToMe's release with a class token: prefix tokens, unmerged A tokens in A order, then B.
    """
    count = tome_count(x.shape[1], state.num_prefix, r)
    return global_merge(x, state, FixedLevel(count=count), policy, layer)
