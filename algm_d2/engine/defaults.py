"""detectron2's command-line contract and per-run setup (config, output folder, logging, seeds)."""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed as dist

from ..cli import EPILOG, default_argument_parser  # noqa: F401 - part of this module's API
from ..config import PRECISIONS, CfgNode, get_cfg, resolve_device
from .runtime import local_processes, set_cpu_threads

logger = logging.getLogger(__name__)
# --eval-only writes its config and results under OUTPUT_DIR/<this>, leaving the training run's files as they are.
EVAL_ONLY_DIR = "eval"


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(output_dir: str, rank: int) -> None:
    """Console (rank 0 at INFO, other ranks at WARNING) and OUTPUT_DIR/log.txt (log.txt.rank<r> for other ranks)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    root.addHandler(console)
    file_handler = logging.FileHandler(Path(output_dir) / ("log.txt" if rank == 0 else f"log.txt.rank{rank}"))
    file_handler.setFormatter(formatter)
    root.addHandler(file_handler)


def load_config(args: argparse.Namespace) -> CfgNode:
    """get_cfg() + --config-file + KEY VALUE overrides, MODEL.DEVICE "auto" resolved (not frozen, no side
    effects)."""
    cfg = get_cfg()
    if args.config_file:
        if not Path(args.config_file).is_file():
            raise FileNotFoundError(f"--config-file {args.config_file}: no such file")
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    cfg.MODEL.DEVICE = resolve_device(cfg.MODEL.DEVICE)
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no GPU is visible; pass MODEL.DEVICE cpu (or "
                         "auto)")
    return cfg


def launch_options(cfg: CfgNode) -> Dict[str, Any]:
    """The keyword arguments of :func:`~algm_d2.engine.launch.launch` the config decides: backend and timeouts."""
    timeouts = {"start_timeout": cfg.DEEPSPEED.START_TIMEOUT, "collective_timeout": cfg.DEEPSPEED.COLLECTIVE_TIMEOUT}
    for key, value in timeouts.items():
        if value <= 0:
            raise ValueError(f"DEEPSPEED.{key.upper()} must be > 0 seconds, got {value}")
    return {"backend": distributed_backend(cfg), **timeouts}


def check_config(cfg: CfgNode) -> None:
    """Keys whose mistakes would otherwise surface only after training (periods, enumerations read at evaluation):
    ValueError naming the key and the allowed values. Run by setup() and the Trainer."""
    from ..evaluation import FLOP_COUNT_BACKENDS
    from ..modeling.backbone.build import POS_EMBED_INTERPS
    from ..modeling.meta_arch.segmentation_model import SMALL_IMAGE_RULES, TEST_MODES
    choices = {"TEST.PRECISION": (cfg.TEST.PRECISION, PRECISIONS),
               "TEST.FLOPS_BACKEND": (cfg.TEST.FLOPS_BACKEND, FLOP_COUNT_BACKENDS),
               "TEST.MODE": (cfg.TEST.MODE, TEST_MODES),
               "TEST.SLIDE_SMALL_IMAGE": (cfg.TEST.SLIDE_SMALL_IMAGE, SMALL_IMAGE_RULES),
               "MODEL.BACKBONE.POS_EMBED_INTERP": (cfg.MODEL.BACKBONE.POS_EMBED_INTERP, POS_EMBED_INTERPS)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key in ("SOLVER.CHECKPOINT_PERIOD", "SOLVER.LOG_PERIOD", "SOLVER.MAX_ITER"):
        section, name = key.split(".")
        if cfg[section][name] <= 0:
            raise ValueError(f"{key} must be > 0, got {cfg[section][name]}")
    if cfg.TEST.EVAL_PERIOD < 0:
        raise ValueError(f"TEST.EVAL_PERIOD must be >= 0 (0: only at the end), got {cfg.TEST.EVAL_PERIOD}")
    scales = cfg.TEST.SCALES
    if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s <= 0 for s in scales):
        raise ValueError(f"TEST.SCALES must be a non-empty list of positive numbers, got {list(scales)!r}")


def distributed_backend(cfg: CfgNode) -> str:
    """DEEPSPEED.BACKEND, with "auto" = nccl for a CUDA MODEL.DEVICE and gloo otherwise."""
    if cfg.DEEPSPEED.BACKEND != "auto":
        return cfg.DEEPSPEED.BACKEND
    return "nccl" if str(cfg.MODEL.DEVICE).startswith("cuda") else "gloo"


def setup(args: argparse.Namespace) -> CfgNode:
    """The frozen config of this run; OUTPUT_DIR created with the merged config.yaml (rank 0; under ``--eval-only``
    OUTPUT_DIR/eval/config.yaml, so a training run's config stays), logging to the console and OUTPUT_DIR/log.txt,
    CPU threads per process set, generators seeded with SEED + rank (SEED < 0: a random seed)."""
    cfg = load_config(args)
    check_config(cfg)
    cfg.freeze()
    rank = get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logging(cfg.OUTPUT_DIR, rank)
    logger.info("rank %d of %d processes%s", rank, get_world_size(),
                f" ({dist.get_backend()})" if dist.is_available() and dist.is_initialized() else "")
    set_cpu_threads(local_processes(os.environ))
    if rank == 0:
        config_dir = Path(cfg.OUTPUT_DIR) / (EVAL_ONLY_DIR if getattr(args, "eval_only", False) else "")
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "config.yaml").write_text(cfg.dump())
        logger.info("command line: %s", " ".join(sys.argv))
        logger.info("full config saved to %s", config_dir / "config.yaml")
    seed = cfg.SEED if cfg.SEED >= 0 else random.SystemRandom().randrange(2**31)
    seed_everything(seed + rank)
    return cfg
