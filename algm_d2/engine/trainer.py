"""Iteration-based training on DeepSpeed with detectron2's habits.

DeepSpeed runs the model (ZeRO stage 0-3, fp32/bf16/fp16, gradient clipping and accumulation) with a torch
optimizer and our lr scheduler; around it: periodic atomic checkpoints and exact resume, a stop with a usable
checkpoint on a non-finite loss, periodic evaluation, and logs to the console, metrics.json and TensorBoard with a
progress bar on the main rank.
"""
from __future__ import annotations

import datetime
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..config import PRECISIONS
from ..checkpoint import load_model_weights, load_pretrained_vit
from ..data import build_test_loader, build_train_loader, get_metadata
from ..evaluation.visualize import prediction_panels
from ..modeling import build_model
from .training_checkpoints import (
    MODEL_FILE, TAG_PREFIX, TrainingCheckpointer, atomic_write, last_checkpoint, verify_listed_file, write_manifest,
)
from .defaults import EVAL_ONLY_DIR, check_config, get_rank, get_world_size
from .eval_loop import evaluate
from .events import EventWriter
from .lr_schedule import WarmupLRScheduler
from .optim import build_optimizer
from .rng import preserved_rng, set_rng_state
from .runtime import import_deepspeed, without_shm_comm_op

logger = logging.getLogger(__name__)
FINAL_WEIGHTS = "model_final.pth"


def deepspeed_config(cfg, world_size: int) -> Dict[str, Any]:  # noqa: ANN001 - a CfgNode
    """DeepSpeed's JSON config from SOLVER.* and DEEPSPEED.*; errors name the keys that do not fit together."""
    solver, ds = cfg.SOLVER, cfg.DEEPSPEED
    if ds.PRECISION not in PRECISIONS:
        raise ValueError(f"DEEPSPEED.PRECISION must be one of {PRECISIONS}, got {ds.PRECISION!r}")
    if ds.PRECISION == "fp16" and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise ValueError(f"DEEPSPEED.PRECISION fp16 needs a GPU (MODEL.DEVICE is {cfg.MODEL.DEVICE!r} and DeepSpeed's "
                         "CPU backend has no fp16); use bf16 or fp32")
    if ds.ZERO_STAGE not in (0, 1, 2, 3):
        raise ValueError(f"DEEPSPEED.ZERO_STAGE must be 0, 1, 2 or 3, got {ds.ZERO_STAGE}")
    if solver.GRAD_ACCUM_STEPS < 1:
        raise ValueError(f"SOLVER.GRAD_ACCUM_STEPS must be >= 1, got {solver.GRAD_ACCUM_STEPS}")
    per_step = world_size * solver.GRAD_ACCUM_STEPS
    if solver.IMS_PER_BATCH <= 0 or solver.IMS_PER_BATCH % per_step:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({solver.IMS_PER_BATCH}) must be a positive multiple of the number of "
                         f"processes ({world_size}) x SOLVER.GRAD_ACCUM_STEPS ({solver.GRAD_ACCUM_STEPS})")
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED:
        for key, only in (("CLIP_TYPE", "full_model"), ("NORM_TYPE", 2.0)):
            if clip[key] != only:
                raise ValueError(f"SOLVER.CLIP_GRADIENTS.{key} must be {only!r} (DeepSpeed clips the L2 norm of all "
                                 f"gradients together), got {clip[key]!r}")
        if clip.CLIP_VALUE <= 0:
            raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0, got {clip.CLIP_VALUE}")
    return {
        "train_batch_size": solver.IMS_PER_BATCH,
        "train_micro_batch_size_per_gpu": solver.IMS_PER_BATCH // per_step,
        "gradient_accumulation_steps": solver.GRAD_ACCUM_STEPS,
        "gradient_clipping": float(clip.CLIP_VALUE) if clip.ENABLED else 0.0,
        "zero_optimization": {"stage": ds.ZERO_STAGE},
        "bf16": {"enabled": ds.PRECISION == "bf16"},
        "fp16": {"enabled": ds.PRECISION == "fp16", "initial_scale_power": 16},
        # our torch optimizers are not on DeepSpeed's list of tested ZeRO optimizers; they work (CI covers it)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def eval_weights(cfg) -> Path:  # noqa: ANN001 - a CfgNode
    """The weights ``--eval-only`` evaluates: MODEL.WEIGHTS, else the full weights of OUTPUT_DIR's last checkpoint;
    checked against the manifest that lists them, if any."""
    if cfg.MODEL.WEIGHTS:
        verify_listed_file(Path(cfg.MODEL.WEIGHTS))
        return Path(cfg.MODEL.WEIGHTS)
    checkpoint_dir = Path(cfg.OUTPUT_DIR) / "checkpoints"
    last = last_checkpoint(checkpoint_dir)
    if last is None:
        raise FileNotFoundError(f"--eval-only: MODEL.WEIGHTS is empty and {checkpoint_dir} has no checkpoint; pass "
                                "MODEL.WEIGHTS <file> (a released checkpoint or a model_final.pth)")
    verify_listed_file(last / MODEL_FILE)
    return last / MODEL_FILE


def evaluation_scalars(result: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of one dataset's evaluation that go to metrics.json and TensorBoard: mIoU, fwIoU, mACC, pACC,
    images/s and the share of patch tokens kept after each ALGM layer."""
    scalars = {key: result["sem_seg"][key] for key in ("mIoU", "fwIoU", "mACC", "pACC")}
    if result.get("speed", {}).get("images_per_second") is not None:
        scalars["images_per_second"] = result["speed"]["images_per_second"]
    for entry in result.get("tokens", {}).get("algm_layers", {}).values():
        scalars[f"tokens_kept_after_layer_{entry['layer']}"] = entry["kept_ratio"]
    return scalars


def eval_only_config(cfg) -> Tuple[Any, Path]:  # noqa: ANN001 - a CfgNode
    """(the config ``--eval-only`` evaluates with, the weights it evaluates): OUTPUT_DIR moved to OUTPUT_DIR/eval so
    that the training run's inference/results.json stays as it is."""
    weights = eval_weights(cfg)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / EVAL_ONLY_DIR)
    cfg.freeze()
    return cfg, weights


def warn_if_random_init(cfg) -> None:  # noqa: ANN001 - a CfgNode
    """Warn loudly when a run on real data starts from random weights (neither MODEL.WEIGHTS nor
    MODEL.BACKBONE.PRETRAINED): the paper's models start from ImageNet-pretrained ViTs. The demo data
    (``demo_*``) is meant to be learned from scratch."""
    if cfg.MODEL.WEIGHTS or cfg.MODEL.BACKBONE.PRETRAINED:
        return
    real = [name for name in cfg.DATASETS.TRAIN if not name.startswith("demo_")]
    if real:
        logger.warning("TRAINING FROM RANDOM WEIGHTS on %s: neither MODEL.WEIGHTS nor MODEL.BACKBONE.PRETRAINED is "
                       "set. The paper's models start from ImageNet-pretrained ViTs: pass MODEL.BACKBONE.PRETRAINED "
                       "<timm ViT weights> (docs/TRAINING.md, 'Weights')", ", ".join(real))


class Trainer:
    """Builds the model, optimizer, lr scheduler and DeepSpeed engine from ``cfg``; :meth:`train` runs to
    SOLVER.MAX_ITER. With ``resume`` it continues from OUTPUT_DIR's last checkpoint exactly (iteration, weights,
    optimizer, scheduler, RNG and data order), else it starts from MODEL.WEIGHTS (or from scratch).

    ``build_model`` and ``build_train_loader`` are classmethods to override, as in detectron2's DefaultTrainer.
    """

    def __init__(self, cfg, *, resume: bool = False) -> None:  # noqa: ANN001 - a CfgNode
        deepspeed = import_deepspeed()
        check_config(cfg)
        self.cfg = cfg
        solver = cfg.SOLVER
        self.rank, self.world_size = get_rank(), get_world_size()
        self.output_dir = Path(cfg.OUTPUT_DIR)
        checkpoint_dir = self.output_dir / "checkpoints"
        ds_config = deepspeed_config(cfg, self.world_size)
        model = self.build_model(cfg)
        if not (resume and last_checkpoint(checkpoint_dir) is not None):
            warn_if_random_init(cfg)
            if cfg.MODEL.BACKBONE.PRETRAINED:
                load_pretrained_vit(model.net.backbone, cfg.MODEL.BACKBONE.PRETRAINED)
            if cfg.MODEL.WEIGHTS:
                verify_listed_file(Path(cfg.MODEL.WEIGHTS))
                load_model_weights(model, cfg.MODEL.WEIGHTS)
        optimizer = build_optimizer(cfg, model)
        if cfg.DEEPSPEED.ZERO_STAGE == 3 and any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
            # nn.MultiheadAttention reads its out_proj's weight in its own forward: gather the whole module at once.
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, [torch.nn.MultiheadAttention])
        with without_shm_comm_op():
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=WarmupLRScheduler.from_config(cfg, optimizer),
                config=ds_config)
        self.checkpointer = TrainingCheckpointer(self.engine, checkpoint_dir,
                                                 max_to_keep=solver.MAX_CHECKPOINTS_TO_KEEP)
        self.accum_steps = solver.GRAD_ACCUM_STEPS
        self.start_iter = 0
        # micro-batches this rank's loader has produced: the data order resumes from here
        self.data_position = 0
        configured = self._group_hyperparameters()
        state = self.checkpointer.load() if resume else None
        # the generators are restored when training starts, after everything that draws from them (data iterator)
        self.resume_rng_state = None
        if state is not None:
            self._check_resumable(state)
            self._apply_configured_hyperparameters(configured)
            self.start_iter, self.data_position = state["iteration"], state["data_position"]
            self.resume_rng_state = state["rng"]
        elif resume:
            logger.info("--resume: no checkpoint in %s yet; starting at iteration 0", checkpoint_dir)
        self.train_loader = self.build_train_loader(cfg, total_batch_size=solver.IMS_PER_BATCH // self.accum_steps,
                                                    start_iter=self.data_position)
        self.events = EventWriter(self.output_dir, enabled=self.rank == 0)
        self.last_lr = solver.BASE_LR

    @classmethod
    def build_model(cls, cfg) -> nn.Module:  # noqa: ANN001 - a CfgNode
        return build_model(cfg)

    @classmethod
    def build_train_loader(cls, cfg, *, total_batch_size: int, start_iter: int) -> Any:  # noqa: ANN001
        """Infinite loader of this rank's micro-batches (``total_batch_size`` images over all ranks), from
        micro-batch ``start_iter`` of the run's fixed order."""
        return build_train_loader(cfg, total_batch_size=total_batch_size, start_iter=start_iter)

    @property
    def model(self) -> nn.Module:
        return self.engine.module

    def _trainer_state(self) -> Dict[str, Any]:
        return {"data_position": self.data_position, "world_size": self.world_size,
                "ims_per_batch": self.cfg.SOLVER.IMS_PER_BATCH, "grad_accum_steps": self.accum_steps}

    def _check_resumable(self, state: Dict[str, Any]) -> None:
        """Exact resume needs the same processes and batch layout as the run that wrote the checkpoint."""
        saved = {"world size (processes)": state["world_size"], "SOLVER.IMS_PER_BATCH": state["ims_per_batch"],
                 "SOLVER.GRAD_ACCUM_STEPS": state["grad_accum_steps"]}
        now = {"world size (processes)": self.world_size, "SOLVER.IMS_PER_BATCH": self.cfg.SOLVER.IMS_PER_BATCH,
               "SOLVER.GRAD_ACCUM_STEPS": self.accum_steps}
        changed = [f"{key} {saved[key]} -> {now[key]}" for key in saved if saved[key] != now[key]]
        if changed:
            raise ValueError(f"cannot resume {self.checkpointer.checkpoint_dir} exactly: {', '.join(changed)}; resume "
                             "with the settings of the run that wrote it, or start a new OUTPUT_DIR with MODEL.WEIGHTS")

    def _group_hyperparameters(self) -> List[Dict[str, Any]]:
        """Per optimizer group: its base lr ("initial_lr", layer decay applied) and the other settings, not "lr"
        (the scheduled value of the current step)."""
        return [{key: value for key, value in group.items() if key not in ("params", "lr")}
                for group in self.engine.optimizer.param_groups]

    def _apply_configured_hyperparameters(self, configured: List[Dict[str, Any]]) -> None:
        """Restoring the optimizer and scheduler brings back the checkpoint's base lr and weight decay; the values of
        this run's config (SOLVER.BASE_LR, WEIGHT_DECAY, ...) win, logged, from the resumed iteration on."""
        groups = self.engine.optimizer.param_groups
        changed = sorted({f"{key} {group.get(key)} -> {value}" if index == 0 else key
                          for index, (group, wanted) in enumerate(zip(groups, configured))
                          for key, value in wanted.items() if group.get(key) != value})
        if changed:
            for index, (group, wanted) in enumerate(zip(groups, configured)):
                group.update(wanted)
                self.scheduler.base_lrs[index] = group["initial_lr"]
                group["lr"] = group["initial_lr"] * self.scheduler.lr_lambdas[index](self.scheduler.last_epoch)
            logger.warning("--resume: the config changes optimizer settings of the checkpoint (%s); they apply from "
                           "iteration %d on (lr %.4g there), with the schedule of this config", "; ".join(changed),
                           self.scheduler.last_epoch + 1, max(group["lr"] for group in groups))

    def gathered_parameters(self) -> ContextManager[None]:
        """Every parameter whole on every rank (ZeRO-3 partitions them; evaluation runs ranks unevenly)."""
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        return nullcontext()

    def train(self) -> Dict[str, Any]:
        """Train from ``start_iter`` to SOLVER.MAX_ITER; returns the last evaluation's results ({} when none)."""
        cfg, solver = self.cfg, self.cfg.SOLVER
        max_iter = solver.MAX_ITER
        if self.start_iter >= max_iter:
            logger.info("training is finished: the checkpoint of %s is at iteration %d of SOLVER.MAX_ITER %d; nothing "
                        "to train. Evaluate it with --eval-only, or raise SOLVER.MAX_ITER to train on",
                        self.output_dir, self.start_iter, max_iter)
            self.events.close()
            return {}
        logger.info("training iterations %d..%d: %d images per step (%d processes x %d accumulation steps x %d "
                    "images), ZeRO stage %d, %s", self.start_iter + 1, max_iter, solver.IMS_PER_BATCH, self.world_size,
                    self.accum_steps, self.engine.train_micro_batch_size_per_gpu(), cfg.DEEPSPEED.ZERO_STAGE,
                    cfg.DEEPSPEED.PRECISION)
        data = iter(self.train_loader)
        self.engine.train()
        if self.resume_rng_state is not None:
            set_rng_state(self.resume_rng_state)
        results: Dict[str, Any] = {}
        window: List[Dict[str, float]] = []
        window_start = start_time = time.perf_counter()
        window_data_time = 0.0
        try:
            with tqdm(total=max_iter, initial=self.start_iter, desc="training", unit="it", disable=self.rank != 0,
                      mininterval=10, dynamic_ncols=True) as progress:
                for iteration in range(self.start_iter, max_iter):
                    losses, data_time = self.run_step(iteration, data)
                    step = iteration + 1
                    window.append(losses)
                    window_data_time += data_time
                    progress.update(1)
                    progress.set_postfix(loss=f"{sum(losses.values()):.4f}", refresh=False)
                    if step % solver.LOG_PERIOD == 0 or step == max_iter:
                        now = time.perf_counter()
                        self._log(step, window, (now - window_start) / len(window), window_data_time / len(window),
                                  eta_seconds=(now - start_time) / (step - self.start_iter) * (max_iter - step))
                        window, window_data_time, window_start = [], 0.0, now
                    if step % solver.CHECKPOINT_PERIOD == 0 or step == max_iter:
                        self.save_checkpoint(step)
                    if cfg.DATASETS.TEST and (step == max_iter or (cfg.TEST.EVAL_PERIOD > 0 and
                                                                   step % cfg.TEST.EVAL_PERIOD == 0)):
                        results = self.test(step)
            self.export_final_weights()
        finally:
            self.events.close()
        return results

    def run_step(self, iteration: int, data: Iterator[List[Dict[str, Any]]]) -> Tuple[Dict[str, float], float]:
        """One optimizer step over GRAD_ACCUM_STEPS micro-batches; returns ({loss name: value averaged over the
        micro-batches}, seconds spent waiting for data)."""
        losses: Dict[str, float] = {}
        data_time = 0.0
        self.last_lr = max(group["lr"] for group in self.engine.optimizer.param_groups)  # this step's, undecayed
        for _ in range(self.accum_steps):
            fetch_start = time.perf_counter()
            batch = next(data)
            data_time += time.perf_counter() - fetch_start
            self.data_position += 1
            loss_dict = self.engine(batch)
            self._check_finite(iteration, loss_dict)
            self.engine.backward(sum(loss_dict.values()))
            self.engine.step()
            for name, value in loss_dict.items():
                losses[name] = losses.get(name, 0.0) + float(value.detach()) / self.accum_steps
        return losses, data_time

    def _any_rank(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], device=self.engine.device)  # NCCL reduces device tensors only
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(value)
        return bool(value.item() > 0)

    def _check_finite(self, iteration: int, loss_dict: Dict[str, torch.Tensor]) -> None:
        """Stop every rank before a non-finite loss reaches the weights; the last checkpoint stays the last good one
        (verified here, so the message can say so)."""
        bad = {name: float(value.detach()) for name, value in loss_dict.items() if not torch.isfinite(value).all()}
        if not self._any_rank(bool(bad)):
            return
        terms = ", ".join(f"{name} = {value}" for name, value in bad.items()) or "on another rank"
        raise FloatingPointError(f"loss became non-finite at iteration {iteration + 1} ({terms}); stopped before "
                                 f"that update. {self._last_good_checkpoint()}")

    def _last_good_checkpoint(self) -> str:
        last = last_checkpoint(self.checkpointer.checkpoint_dir)  # raises, naming the file, if it were broken
        if last is None:
            return (f"No checkpoint was written yet (SOLVER.CHECKPOINT_PERIOD {self.cfg.SOLVER.CHECKPOINT_PERIOD}); "
                    "restart with a lower SOLVER.BASE_LR or SOLVER.CLIP_GRADIENTS.ENABLED True.")
        return (f"The last good checkpoint is {last} (complete, checked against its manifest): continue from it with "
                "--resume, e.g. with a lower SOLVER.BASE_LR or SOLVER.CLIP_GRADIENTS.ENABLED True.")

    def _weights_finite(self) -> bool:
        """True when every rank's parameters (its ZeRO-3 slices) are finite."""
        bad = any(not torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in self.model.parameters())
        return not self._any_rank(bad)

    def save_checkpoint(self, step: int) -> Path:
        """Collective; refuses to save non-finite weights, so the last checkpoint stays a good one."""
        if not self._weights_finite():
            raise FloatingPointError(f"the weights became non-finite by iteration {step}; not saving them. "
                                     f"{self._last_good_checkpoint()}")
        return self.checkpointer.save(step, self._trainer_state())

    def _eval_cfg(self):  # noqa: ANN202 - a CfgNode
        """The config for evaluation during training. Under ZeRO-3 the traced graph holds DeepSpeed's own ops instead
        of the linear layers (LinearFunctionForZeroStage3), which the FLOP counter cannot count: GFLOPs are skipped
        there rather than reported wrong (count them with --eval-only on model_final.pth)."""
        if self.engine.zero_optimization_stage() != 3 or not self.cfg.TEST.COMPUTE_FLOPS:
            return self.cfg
        logger.warning("TEST.COMPUTE_FLOPS is skipped during ZeRO-3 training; run --eval-only on model_final.pth "
                       "for GFLOPs")
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.TEST.COMPUTE_FLOPS = False
        cfg.freeze()
        return cfg

    def test(self, step: int) -> Dict[str, Any]:
        """Evaluate on DATASETS.TEST; the training run's generators are left as they were."""
        with preserved_rng():
            results = evaluate(self._eval_cfg(), self.model, gathered_parameters=self.gathered_parameters)
            for name, result in results.items():
                self.events.write({"iteration": step, "dataset": name, **evaluation_scalars(result)},
                                  group=f"eval/{name}")
                self._write_prediction_images(name, step)
        return results

    def _write_prediction_images(self, dataset: str, step: int) -> None:
        """TEST.TENSORBOARD_IMAGES panels (input | ground truth | prediction) of ``dataset``'s first images."""
        count = self.cfg.TEST.TENSORBOARD_IMAGES
        if count <= 0:
            return
        metadata = get_metadata(dataset)
        panels = []
        with self.gathered_parameters():  # collective under ZeRO-3: every rank enters, rank 0 predicts
            if self.rank == 0:
                loader = build_test_loader(self.cfg, dataset, rank=0, world_size=1, num_workers=0)
                panels = prediction_panels(self.model, loader, num_images=count, colors=metadata.stuff_colors,
                                           ignore_label=metadata.ignore_label)
        for index, panel in enumerate(panels):
            self.events.write_image(f"eval/{dataset}/prediction_{index}", panel, step)

    def _log(self, step: int, window: List[Dict[str, float]], seconds_per_iter: float, data_time: float, *,
             eta_seconds: float) -> None:
        """Losses averaged over the iterations since the last log and over ranks; console + metrics.json + TB."""
        names = sorted(window[-1])
        values = torch.tensor([sum(losses[n] for losses in window) / len(window) for n in names],
                              dtype=torch.float64, device=self.engine.device)
        on_cuda = self.engine.device.type == "cuda"
        # detectron2's max_mem: the peak allocated memory of the busiest rank (MB).
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.engine.device) / 2**20 if on_cuda else 0.0],
                            dtype=torch.float64, device=self.engine.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
            values /= self.world_size
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if self.rank != 0:
            return
        losses = dict(zip(names, values.cpu().tolist()))
        record = {"iteration": step, "total_loss": sum(losses.values()), **losses,
                  "lr": self.last_lr, "time": seconds_per_iter, "data_time": data_time,
                  "images_per_second": self.cfg.SOLVER.IMS_PER_BATCH / seconds_per_iter, "eta_seconds": eta_seconds}
        if on_cuda:
            record["max_mem_mb"] = float(peak)
        self.events.write(record, group="train")
        logger.info("iter: %d/%d  %s  lr: %.4g  time: %.4f  data_time: %.4f  eta: %s%s", step,
                    self.cfg.SOLVER.MAX_ITER,
                    "  ".join(f"{name}: {record[name]:.4f}" for name in ("total_loss", *names)), record["lr"],
                    seconds_per_iter, data_time, datetime.timedelta(seconds=int(eta_seconds)),
                    f"  max_mem: {record['max_mem_mb']:.0f}M" if on_cuda else "")

    def export_final_weights(self) -> Path:
        """OUTPUT_DIR/model_final.pth: the last checkpoint's full float32 weights (``{"model": state dict}``),
        loadable with MODEL.WEIGHTS; OUTPUT_DIR/manifest.json records its checksum."""
        path = self.output_dir / FINAL_WEIGHTS
        if self.rank == 0:
            last = last_checkpoint(self.checkpointer.checkpoint_dir)
            with open(last / MODEL_FILE, "rb") as weights:
                atomic_write(path, lambda f: shutil.copyfileobj(weights, f))
            write_manifest(self.output_dir, int(last.name[len(TAG_PREFIX):]), names=[FINAL_WEIGHTS])
            logger.info("final weights: %s", path)
        return path
