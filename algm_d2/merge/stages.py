"""Which merge runs after the attention of a layer, and how (the one entry point the backbone calls)."""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple, Union

from torch import Tensor

from .clap import LocalPlan, apply_local_merge, local_merge, plan_local_merge
from .config import ALGMConfig, Rule
from .gbm import GlobalPlan, apply_global_merge, global_merge, plan_global_merge
from .rules import SequenceSizes
from .state import MergeState
from .tome import tome_merge
from .variants import Stage, pick_random_members, without_reduction


def stage_rule(config: ALGMConfig, name: str) -> Rule:
    """The threshold rule of stage ``name``: the global one for GBM, the local one for CLAP and a local GBM."""
    return config.global_threshold if name == "gbm" else config.local_threshold


def stage_function(config: ALGMConfig, name: str, layer: int) -> Stage:
    """The merge ``name`` (one of :meth:`ALGMConfig.stages_at`) as ``(x, state) -> (x, state)``."""
    policy = config.batch_policy
    if name == "clap":
        merge = partial(local_merge, window=config.window, rule=stage_rule(config, name), policy=policy, layer=layer)
    elif name in ("local_gbm", "gbm"):
        merge = partial(global_merge, rule=stage_rule(config, name), policy=policy, layer=layer)
    elif name == "tome":
        merge = partial(tome_merge, r=config.tome_r, policy=policy, layer=layer)
    else:
        raise ValueError(f"unknown merge stage {name!r}")
    if config.merge_value == "average":
        return merge

    def merge_with_random_members(x: Tensor, state: MergeState) -> Tuple[Tensor, MergeState]:
        merged, new_state = merge(x, state)
        if new_state is state:
            return merged, new_state
        return pick_random_members(x, state, merged, new_state), new_state

    return merge_with_random_members


def merge_after_attention(x: Tensor, state: MergeState, config: ALGMConfig, layer: int) -> Tuple[Tensor, MergeState]:
    """Run the stages ``config`` places at 1-based ``layer`` (CLAP first when both are there); else return as is."""
    for name in config.stages_at(layer):
        stage = stage_function(config, name, layer)
        x, state = stage(x, state) if config.reduce_tokens else without_reduction(x, state, stage)
    return x, state


StagePlan = Union[LocalPlan, GlobalPlan]
# the stages that split into a plan and its application (ToMe and the Table 6 variants run whole)
SPLIT_STAGES = frozenset({"clap", "local_gbm", "gbm"})


def splits_into_plans(config: ALGMConfig, depth: int) -> bool:
    """Whether every stage of ``config`` in a ``depth``-block model can run as :func:`plan_stage` then
    :func:`apply_stage` (the averaging, token-reducing ALGM stages)."""
    return config.merge_value == "average" and config.reduce_tokens and all(
        set(config.stages_at(layer)) <= SPLIT_STAGES for layer in range(1, depth + 1))


def plan_stage(config: ALGMConfig, name: str, layer: int, x: Tensor, state: MergeState) -> Optional[StagePlan]:
    """The first half of stage ``name`` at 1-based ``layer`` (no host sync); None if it can merge nothing."""
    policy = config.batch_policy
    if name == "clap":
        return plan_local_merge(x, state, config.window, stage_rule(config, name), policy, layer)
    if name in ("local_gbm", "gbm"):
        return plan_global_merge(x, state, stage_rule(config, name), policy, layer)
    raise ValueError(f"stage {name!r} does not split into a plan and its application")


def apply_stage(config: ALGMConfig, name: str, x: Tensor, state: MergeState, plan: StagePlan, sizes: SequenceSizes,
                seq_len: Optional[int] = None) -> Tuple[Tensor, MergeState]:
    """The second half of stage ``name``: apply ``plan`` (output ``sizes`` on the host), padded to ``seq_len``."""
    if name == "clap":
        return apply_local_merge(x, state, plan, config.window, sizes, seq_len=seq_len)
    return apply_global_merge(x, state, plan, sizes, seq_len=seq_len)


def stage_changes_tokens(name: str, sizes: SequenceSizes, length: int) -> bool:
    """Whether applying a plan with output ``sizes`` to ``length`` tokens changes them: CLAP that merges no window
    leaves them as they are; GBM always reorders (the release's order), even when it merges nothing."""
    return name != "clap" or sizes.shortest != length
