"""Which merge runs after the attention of a layer, and how (the one entry point the backbone calls)."""
from __future__ import annotations

from functools import partial
from typing import Tuple

from torch import Tensor

from .clap import local_merge
from .config import ALGMConfig
from .gbm import global_merge
from .state import MergeState
from .tome import tome_merge
from .variants import Stage, pick_random_members, without_reduction


def stage_function(config: ALGMConfig, name: str, layer: int) -> Stage:
    """The merge ``name`` (one of :meth:`ALGMConfig.stages_at`) as ``(x, state) -> (x, state)``."""
    policy = config.batch_policy
    if name == "clap":
        merge = partial(local_merge, window=config.window, rule=config.local_threshold, policy=policy, layer=layer)
    elif name == "local_gbm":
        merge = partial(global_merge, rule=config.local_threshold, policy=policy, layer=layer)
    elif name == "gbm":
        merge = partial(global_merge, rule=config.global_threshold, policy=policy, layer=layer)
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
