"""Mask2Former's ``train_net.py`` with algm_d2: its ``main`` and its ``Trainer`` (evaluators, dataset mappers, poly lr
schedule, test-time augmentation), with :func:`~algm_d2.d2.add_algm_config` in the setup, algm_d2's parameter
groups in the optimizer (:func:`~algm_d2.d2.build_optimizer`) and SOLVER.AMP.PRECISION for AMP training.

Mask2Former's script is loaded from its checkout (the one ``import mask2former`` finds) as a private module, and
its ``setup`` and ``Trainer`` are replaced there, so its ``main`` runs unchanged. Command line:
``tools/d2_train_net.py`` (docs/DETECTRON2.md).
"""
from __future__ import annotations

import argparse
import importlib.util
from types import ModuleType
from typing import Any

import torch
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .config import CfgNode, get_cfg, mask2former_root
from .optim import build_optimizer

AMP_PRECISIONS = ("float16", "bfloat16")


def load_mask2former_train_net() -> ModuleType:
    """Mask2Former's ``train_net.py`` as a fresh module of its own (not in ``sys.modules``)."""
    path = mask2former_root() / "train_net.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Mask2Former's train_net.py is not beside the mask2former package; use a "
                                "full clone of Mask2Former on PYTHONPATH")
    spec = importlib.util.spec_from_file_location("mask2former_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def setup(args: argparse.Namespace) -> CfgNode:
    """Mask2Former's setup with algm_d2's keys: the config file, the command-line overrides, detectron2's setup."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.SOLVER.AMP.PRECISION not in AMP_PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {AMP_PRECISIONS}, got {cfg.SOLVER.AMP.PRECISION!r}")
    cfg.freeze()
    default_setup(cfg, args)
    for name in ("mask2former", "algm_d2"):
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)
    return cfg


def trainer_class(mask2former_trainer: type) -> type:
    """Mask2Former's Trainer with algm_d2's optimizer and the AMP dtype of SOLVER.AMP.PRECISION."""

    class Trainer(mask2former_trainer):  # type: ignore[valid-type, misc]
        def __init__(self, cfg: CfgNode) -> None:
            super().__init__(cfg)
            if cfg.SOLVER.AMP.ENABLED:
                self._trainer.precision = getattr(torch, cfg.SOLVER.AMP.PRECISION)

        @classmethod
        def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
            return build_optimizer(cfg, model)

    return Trainer


def main(args: argparse.Namespace) -> Any:
    """Mask2Former's ``main(args)``: train (``--resume``) or ``--eval-only``; returns its results."""
    train_net = load_mask2former_train_net()
    train_net.setup = setup
    train_net.Trainer = trainer_class(train_net.Trainer)
    return train_net.main(args)
