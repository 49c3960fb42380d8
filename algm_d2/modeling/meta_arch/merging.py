"""What every network with an ALGM backbone offers its callers: the merge switches and the last forward's stats."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, TypedDict

from ...merge import ALGMConfig, MergeState


class MergeStats(TypedDict):
    """A network's ``merge_stats`` (the dict :meth:`MergeState.stats` builds): ``tokens_per_layer`` one list per
    block run of the token counts leaving it (one int per image or crop, prefix tokens included), ``initial_tokens``
    entering block 1 (prefix included) and ``num_prefix`` (class/register tokens). Before any forward: no layer and
    0 tokens."""

    tokens_per_layer: List[List[int]]
    initial_tokens: int
    num_prefix: int


def combined_merge_stats(forwards: Sequence[Mapping]) -> MergeStats:
    """The stats of several forwards (crops, views, images) as one: each block's counts concatenated over them, in
    order; the empty stats for none."""
    if not forwards:
        return MergeStats(tokens_per_layer=[], initial_tokens=0, num_prefix=0)
    per_layer = [sum((s["tokens_per_layer"][i] for s in forwards), [])
                 for i in range(len(forwards[0]["tokens_per_layer"]))]
    return MergeStats(tokens_per_layer=per_layer, initial_tokens=forwards[0]["initial_tokens"],
                      num_prefix=forwards[0]["num_prefix"])


class MergingNetwork:
    """Mixin for an ``nn.Module`` whose ``backbone`` is an ALGM backbone and whose forward stores the final merge
    state in ``_last_state``."""

    _last_state: Optional[MergeState] = None

    @property
    def algm(self) -> ALGMConfig:
        return self.backbone.algm

    def set_algm(self, config: ALGMConfig) -> None:
        """Switch merging (training-free: the weights are unchanged; e.g. evaluate with a lower τ as ALGM*)."""
        config.check_depth(self.backbone.depth)
        self.backbone.algm = config

    @property
    def merge_stats(self) -> MergeStats:
        """Of the last forward (:class:`MergeStats`)."""
        return combined_merge_stats([] if self._last_state is None else [self._last_state.stats()])
