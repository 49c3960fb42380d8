"""Learning-rate schedules as a pure function of the iteration, and the scheduler that applies one."""
from __future__ import annotations

import math
from functools import partial

import torch

SCHEDULES = ("poly", "cosine")


def lr_factor(iteration: int, *, max_iter: int, schedule: str, base_lr: float, min_lr: float = 0.0,
              power: float = 0.9, warmup_iters: int = 0, warmup_factor: float = 0.001) -> float:
    """The multiplier of ``base_lr`` for 0-based ``iteration``.

    poly: ``(base - min) * (1 - t/T)^power + min`` (the Segmenter release's PolynomialLR); cosine: ``min + (base -
    min) * (1 + cos(pi t/T)) / 2``; t is clamped to T. During the first ``warmup_iters`` iterations the factor is
    also multiplied by a linear ramp from ``warmup_factor`` (at t = 0) to 1 (detectron2's and mmseg's "linear").
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"SOLVER.LR_SCHEDULER must be one of {SCHEDULES}, got {schedule!r}")
    if max_iter <= 0:
        raise ValueError(f"SOLVER.MAX_ITER must be > 0, got {max_iter}")
    if base_lr <= 0 or not 0 <= min_lr <= base_lr:
        raise ValueError(f"need SOLVER.BASE_LR > 0 and 0 <= SOLVER.MIN_LR <= BASE_LR, got {base_lr} and {min_lr}")
    progress = min(iteration, max_iter) / max_iter
    if schedule == "poly":
        lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    else:
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    factor = lr / base_lr
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


class WarmupLRScheduler(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over :func:`lr_factor`: each parameter group's lr is its initial lr (layer decay scales it)
    times the factor. Stepped once per optimizer step; its state (the iteration) is saved in checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_iter: int, schedule: str, base_lr: float,
                 min_lr: float = 0.0, power: float = 0.9, warmup_iters: int = 0, warmup_factor: float = 0.001) -> None:
        factor = partial(lr_factor, max_iter=max_iter, schedule=schedule, base_lr=base_lr, min_lr=min_lr,
                         power=power, warmup_iters=warmup_iters, warmup_factor=warmup_factor)
        factor(0)  # bad settings fail here, not at the first step
        super().__init__(optimizer, factor)

    @classmethod
    def from_config(cls, cfg, optimizer: torch.optim.Optimizer) -> "WarmupLRScheduler":  # noqa: ANN001 - a CfgNode
        solver = cfg.SOLVER
        return cls(optimizer, max_iter=solver.MAX_ITER, schedule=solver.LR_SCHEDULER, base_lr=solver.BASE_LR,
                   min_lr=solver.MIN_LR, power=solver.POLY_POWER, warmup_iters=solver.WARMUP_ITERS,
                   warmup_factor=solver.WARMUP_FACTOR)
