"""Learning-rate schedules as pure functions of the step, and a scheduler that applies one (state = the step)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("poly", "cosine")


def lr_factor(step: int, *, max_iter: int, schedule: str, base_lr: float, min_lr: float = 0.0, power: float = 0.9,
              warmup_iters: int = 0, warmup_factor: float = 0.001) -> float:
    """Multiplier of ``base_lr`` at ``step`` (0-based): poly or cosine decay to ``min_lr``, then linear warmup.

    poly: (base - min)·(1 - t/T)^power + min (the Segmenter release's PolynomialLR); cosine: min + (base - min)·
    (1 + cos(π t/T)) / 2. During warmup the factor ramps linearly from ``warmup_factor`` to 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"SOLVER.LR_SCHEDULER must be one of {SCHEDULES}, got {schedule!r}")
    progress = min(step, max_iter) / max(max_iter, 1)
    if schedule == "poly":
        lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    else:
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    factor = lr / base_lr if base_lr else 0.0
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


class StepLRScheduler(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over :func:`lr_factor`; each param group keeps its own base lr (layer decay scales it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_iter: int, schedule: str, base_lr: float,
                 min_lr: float, power: float, warmup_iters: int, warmup_factor: float) -> None:
        kwargs = dict(max_iter=max_iter, schedule=schedule, base_lr=base_lr, min_lr=min_lr, power=power,
                      warmup_iters=warmup_iters, warmup_factor=warmup_factor)
        lr_factor(0, **kwargs)  # validate now, not at the first step
        super().__init__(optimizer, lambda step: lr_factor(step, **kwargs))
