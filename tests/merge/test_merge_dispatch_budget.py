"""A budget on the operations one merge dispatches: in eager CUDA inference every one of them is host time on the
critical path after the merge's count sync, so the count must not creep up unnoticed. The budgets are the counts of
the current implementation (views included) with a margin of about 5%; lower them when a merge gets leaner."""
from __future__ import annotations

from typing import List

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from algm_d2.merge import FixedLevel, MergeState, global_merge, local_merge

# (rule, CLAP budget, GBM budget): aten operations of one stage on a batch of 4, prefix token included
BUDGETS = [(0.5, 107, 116), ("batch_stats", 131, 141), (FixedLevel(fraction=0.25), 101, 103)]


class DispatchCounter(TorchDispatchMode):
    """Records every aten operation dispatched inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def tokens(batch: int = 4, grid: int = 8, dim: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1 + grid * grid, dim, generator=generator)
    x[:, 1:17] = x[:, 1:2]  # a flat region: both stages merge something
    return x


@pytest.mark.parametrize("policy", ["min", "per_image"])
@pytest.mark.parametrize("rule, clap_budget, gbm_budget", BUDGETS)
def test_one_merge_dispatches_at_most_its_budget(rule, clap_budget: int, gbm_budget: int, policy: str):
    x = tokens()
    state = MergeState.initial(x.shape[0], (8, 8), 1, x.device)
    with DispatchCounter() as clap:
        merged, state = local_merge(x, state, (2, 2), rule, policy, 1)
    with DispatchCounter() as gbm:
        merged, state = global_merge(merged, state, rule, policy, 5)
    assert state.merged and merged.shape[1] < x.shape[1]  # both stages did merge
    assert len(clap.ops) <= clap_budget, f"CLAP dispatched {len(clap.ops)} ops (budget {clap_budget})"
    assert len(gbm.ops) <= gbm_budget, f"GBM dispatched {len(gbm.ops)} ops (budget {gbm_budget})"


def test_the_counter_sees_every_operation():
    """The budget means something only if the counter counts: three ops in, three counted."""
    with DispatchCounter() as counter:
        torch.ones(3).add(1).sum()
    assert counter.ops == ["aten.ones.default", "aten.add.Tensor", "aten.sum.default"]
