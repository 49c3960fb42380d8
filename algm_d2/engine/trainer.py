"""Iteration-based training on DeepSpeed (ZeRO 0-3, fp32/bf16/fp16, clipping, accumulation) with detectron2's habits:
periodic atomic checkpoints, exact resume, periodic evaluation, console + metrics.json + TensorBoard logging."""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..checkpoint import load_model_weights
from ..data import build_train_loader
from ..modeling import build_model
from .checkpoint import (
    consolidated_state_dict, last_checkpoint, load_training_checkpoint, save_training_checkpoint,
)
from .defaults import get_rank, get_world_size
from .evaluation import evaluate
from .lr_schedule import StepLRScheduler
from .optim import build_optimizer

logger = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "fp16")


def deepspeed_config(cfg, world_size: int) -> Dict[str, Any]:  # noqa: ANN001 - a CfgNode
    """The DeepSpeed JSON config from SOLVER.* and DEEPSPEED.*; errors name the keys that do not fit together."""
    solver, ds = cfg.SOLVER, cfg.DEEPSPEED
    if ds.PRECISION not in PRECISIONS:
        raise ValueError(f"DEEPSPEED.PRECISION must be one of {PRECISIONS}, got {ds.PRECISION!r}")
    if ds.PRECISION == "fp16" and not torch.cuda.is_available():
        raise ValueError("DEEPSPEED.PRECISION fp16 needs a GPU (DeepSpeed's CPU backend has no fp16); use bf16")
    if not 0 <= ds.ZERO_STAGE <= 3:
        raise ValueError(f"DEEPSPEED.ZERO_STAGE must be 0-3, got {ds.ZERO_STAGE}")
    per_step = world_size * solver.GRAD_ACCUM_STEPS
    if solver.IMS_PER_BATCH % per_step:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({solver.IMS_PER_BATCH}) must be divisible by world size "
                         f"({world_size}) x SOLVER.GRAD_ACCUM_STEPS ({solver.GRAD_ACCUM_STEPS})")
    return {
        "train_batch_size": solver.IMS_PER_BATCH,
        "train_micro_batch_size_per_gpu": solver.IMS_PER_BATCH // per_step,
        "gradient_accumulation_steps": solver.GRAD_ACCUM_STEPS,
        "gradient_clipping": float(solver.CLIP_GRADIENTS),
        "zero_optimization": {"stage": ds.ZERO_STAGE},
        "bf16": {"enabled": ds.PRECISION == "bf16"},
        "fp16": {"enabled": ds.PRECISION == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Trainer:
    """Builds the model, optimizer, scheduler and DeepSpeed engine from ``cfg`` and runs SOLVER.MAX_ITER steps."""

    def __init__(self, cfg, *, resume: bool = False) -> None:  # noqa: ANN001 - a CfgNode
        import deepspeed

        self.cfg = cfg
        self.rank, self.world_size = get_rank(), get_world_size()
        self.output_dir = Path(cfg.OUTPUT_DIR)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        model = build_model(cfg)
        if cfg.MODEL.WEIGHTS and not (resume and last_checkpoint(self.checkpoint_dir)):
            load_model_weights(model, cfg.MODEL.WEIGHTS)
        optimizer = build_optimizer(cfg, model)
        solver = cfg.SOLVER
        scheduler = StepLRScheduler(optimizer, max_iter=solver.MAX_ITER, schedule=solver.LR_SCHEDULER,
                                    base_lr=solver.BASE_LR, min_lr=solver.MIN_LR, power=solver.POLY_POWER,
                                    warmup_iters=solver.WARMUP_ITERS, warmup_factor=solver.WARMUP_FACTOR)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.world_size))
        self.start_iter = load_training_checkpoint(self.engine, self.checkpoint_dir) if resume else 0
        self.accum = solver.GRAD_ACCUM_STEPS
        self.loader = build_train_loader(cfg, total_batch_size=solver.IMS_PER_BATCH // self.accum,
                                         start_iter=self.start_iter * self.accum)
        self.writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    @contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """All parameters whole on every rank (ZeRO-3 partitions them; evaluation runs ranks unevenly)."""
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                yield
        else:
            yield

    def train(self, stop_at: Optional[int] = None) -> Dict[str, Any]:
        """Train to SOLVER.MAX_ITER, or stop after step ``stop_at`` (a time-boxed job; resume continues it)."""
        cfg, solver = self.cfg, self.cfg.SOLVER
        max_iter = solver.MAX_ITER
        data = iter(self.loader)
        self.engine.train()
        bar = tqdm(total=max_iter, initial=self.start_iter, desc="training", unit="it", disable=self.rank != 0,
                   mininterval=10)
        results: Dict[str, Any] = {}
        start_time = time.perf_counter()
        for iteration in range(self.start_iter, max_iter):
            step_start = time.perf_counter()
            data_time = 0.0
            losses_sum: Dict[str, float] = {}
            for _ in range(self.accum):
                fetch = time.perf_counter()
                batch = next(data)
                data_time += time.perf_counter() - fetch
                losses = self.engine(batch)
                loss = sum(losses.values())
                self._check_finite(iteration, losses)
                self.engine.backward(loss)
                self.engine.step()
                for name, value in losses.items():
                    losses_sum[name] = losses_sum.get(name, 0.0) + float(value.detach()) / self.accum
            step = iteration + 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses_sum.values()):.4f}", refresh=False)
            if step % solver.LOG_PERIOD == 0 or step == max_iter:
                self._log(step, losses_sum, time.perf_counter() - step_start, data_time, start_time)
            if step % solver.CHECKPOINT_PERIOD == 0 or step == max_iter:
                save_training_checkpoint(self.engine, self.checkpoint_dir, step, solver.MAX_CHECKPOINTS_TO_KEEP)
            if cfg.DATASETS.TEST and (step == max_iter or (cfg.TEST.EVAL_PERIOD and step % cfg.TEST.EVAL_PERIOD == 0)):
                results = evaluate(self._eval_cfg(), self.model, self.gathered_parameters)
                self._log_eval(step, results)
            if stop_at is not None and step >= stop_at and step < max_iter:
                save_training_checkpoint(self.engine, self.checkpoint_dir, step, solver.MAX_CHECKPOINTS_TO_KEEP)
                bar.close()
                return results
        bar.close()
        self.export_final_weights()
        return results

    def _eval_cfg(self):  # noqa: ANN202 - a CfgNode
        """ZeRO-3's partitioning hooks hide weights from the FLOP counter's trace: skip GFLOPs there rather than
        report a wrong number (count them with --eval-only on the exported model_final.pth)."""
        if self.engine.zero_optimization_stage() != 3 or not self.cfg.TEST.COMPUTE_FLOPS:
            return self.cfg
        logger.warning("TEST.COMPUTE_FLOPS is skipped during ZeRO-3 training (partitioned weights); run --eval-only "
                       "on model_final.pth for GFLOPs")
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.TEST.COMPUTE_FLOPS = False
        cfg.freeze()
        return cfg

    def _check_finite(self, iteration: int, losses: Dict[str, torch.Tensor]) -> None:
        """Stop before a non-finite loss reaches the weights; the last checkpoint stays the last good one."""
        bad = {name: float(value) for name, value in losses.items() if not torch.isfinite(value).all()}
        flag = torch.tensor([1.0 if bad else 0.0], device=self.engine.device)  # NCCL reduces device tensors only
        if dist.is_initialized():
            dist.all_reduce(flag)  # every rank stops together
        if bad or flag.item() > 0:
            tag = last_checkpoint(self.checkpoint_dir)
            where = f"the last good checkpoint is {self.checkpoint_dir / tag}" if tag else "no checkpoint was saved"
            raise FloatingPointError(f"loss became non-finite at iteration {iteration + 1} "
                                     f"({bad or 'on another rank'}); stopping: {where}")

    def _log(self, step: int, losses: Dict[str, float], step_time: float, data_time: float, start: float) -> None:
        names = sorted(losses)
        values = torch.tensor([losses[n] for n in names], dtype=torch.float64, device=self.engine.device)
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world_size
        values = values.cpu()
        if self.rank != 0:
            return
        done = step - self.start_iter
        eta = (time.perf_counter() - start) / max(done, 1) * (self.cfg.SOLVER.MAX_ITER - step)
        record = {"iteration": step, **dict(zip(names, values.tolist())), "total_loss": float(values.sum()),
                  "lr": self.scheduler.get_last_lr()[0], "time": step_time, "data_time": data_time, "eta_seconds": eta}
        with open(self.output_dir / "metrics.json", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key in ("total_loss", "lr", *names):
            self.writer.add_scalar(f"train/{key}", record[key], step)
        logger.info("iter %d  loss %.4f  lr %.3g  %.3fs/it  eta %s", step, record["total_loss"], record["lr"],
                    step_time, time.strftime("%H:%M:%S", time.gmtime(eta)))

    def _log_eval(self, step: int, results: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        for name, result in results.items():
            for key in ("mIoU", "fwIoU", "mACC", "pACC"):
                self.writer.add_scalar(f"{name}/{key}", result["sem_seg"][key], step)
            with open(self.output_dir / "metrics.json", "a") as f:
                f.write(json.dumps({"iteration": step, "dataset": name, **{k: result["sem_seg"][k] for k in (
                    "mIoU", "fwIoU", "mACC", "pACC")}}) + "\n")

    def export_final_weights(self) -> Optional[Path]:
        """``model_final.pth`` = {"model": full float32 state dict}: loadable with MODEL.WEIGHTS."""
        state = consolidated_state_dict(self.engine)
        if self.rank != 0:
            return None
        path = self.output_dir / "model_final.pth"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": state}, tmp)
        tmp.replace(path)
        logger.info("final weights written to %s", path)
        if self.writer is not None:
            self.writer.close()
        return path
