"""What every network with an ALGM backbone offers its callers: the merge switches and the last forward's stats."""
from __future__ import annotations

from typing import Any, Dict, Optional

from ...merge import ALGMConfig, MergeState


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
    def merge_stats(self) -> Dict[str, Any]:
        """Of the last forward: ``tokens_per_layer`` (per block run, per image, prefix tokens included),
        ``initial_tokens`` (entering block 1) and ``num_prefix``."""
        if self._last_state is None:
            return {"tokens_per_layer": [], "initial_tokens": 0, "num_prefix": 0}
        return self._last_state.stats()
