"""detectron2's command-line contract and per-run setup (config, output folder, logging, seeds)."""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import CfgNode, get_cfg

logger = logging.getLogger(__name__)


def default_argument_parser(description: str = "algm_d2 training and evaluation") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a YAML config (with _BASE_)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR's last checkpoint (iteration, optimizer, scheduler, RNG, data)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (or the last checkpoint)")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU processes)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine (0..num_machines-1)")
    parser.add_argument("--dist-url", default="auto",
                        help="'auto' (free local port, one machine), 'env://', or tcp://HOST:PORT of machine 0")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="KEY VALUE pairs overriding the config, e.g. SOLVER.BASE_LR 0.01")
    return parser


def get_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_logging(output_dir: Optional[str], rank: int) -> None:
    """Console (rank 0 at INFO, others at WARNING) and OUTPUT_DIR/log.txt (log.txt.rankN for other ranks)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(formatter)
    root.addHandler(console)
    if output_dir:
        name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
        file_handler = logging.FileHandler(Path(output_dir) / name)
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)


def setup(args: argparse.Namespace) -> CfgNode:
    """Config from file + overrides, frozen; OUTPUT_DIR created with the merged config.yaml; logging; seed."""
    cfg = get_cfg()
    if args.config_file:
        if not Path(args.config_file).is_file():
            raise FileNotFoundError(f"--config-file {args.config_file}: no such file")
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    if cfg.MODEL.DEVICE == "cuda" and not torch.cuda.is_available():
        raise ValueError("MODEL.DEVICE is 'cuda' but no GPU is visible; pass MODEL.DEVICE cpu")
    cfg.freeze()
    rank = get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logging(cfg.OUTPUT_DIR, rank)
    if rank == 0:
        (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())
        logger.info("command: %s", " ".join(sys.argv))
        logger.info("full config saved to %s", Path(cfg.OUTPUT_DIR) / "config.yaml")
    seed = cfg.SEED if cfg.SEED >= 0 else random.SystemRandom().randrange(2**31)
    seed_everything(seed + rank)
    return cfg
