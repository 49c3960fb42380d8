"""Mask2Former's own train_net.main (through algm_d2.d2.train_net) end to end on a tiny registered dataset:
a few training iterations, the final evaluation, then --eval-only on the saved model_final.pth."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List

import pytest
import torch

from .common import (
    CONFIGS, MERGING, SLIDE_TEST, TINY_ENCODER, TINY_INPUT, TINY_MASK2FORMER, register_tiny_dataset,
)

from detectron2.engine import default_argument_parser  # noqa: E402

from algm_d2.d2.config import mask2former_root  # noqa: E402
from algm_d2.d2.train_net import load_mask2former_train_net, main  # noqa: E402


def run(config: str, *opts: object) -> Dict[str, Any]:
    """``tools/d2_train_net.py --config-file configs/detectron2/ade20k/<config> <opts>`` in this process."""
    args = default_argument_parser().parse_args(
        ["--config-file", str(CONFIGS / config)] + [repr(v) if isinstance(v, (tuple, list)) else str(v) for v in opts])
    return main(args)


@pytest.mark.parametrize("config,model_opts", [
    ("maskformer2_vit_base_merged_tokens_512_algm.yaml", TINY_MASK2FORMER + MERGING),
    ("algm_segmenter_vit_small_mask_512_algm.yaml", MERGING + SLIDE_TEST),
])
def test_train_then_eval_only(config, model_opts, tmp_path):
    torch.manual_seed(0)
    train = register_tiny_dataset(tmp_path / "train", "algm_d2_tiny_train", 4, seed=0)
    val = register_tiny_dataset(tmp_path / "val", "algm_d2_tiny_val", 2, seed=1)
    output = tmp_path / "out"
    opts: List[object] = TINY_ENCODER + TINY_INPUT + list(model_opts) + [
        "DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,), "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3,
        "SOLVER.CHECKPOINT_PERIOD", 1000, "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", output, "SEED", 0]
    assert run(config, *opts) is None  # detectron2's trainer returns results only with TEST.EXPECTED_RESULTS
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(loss) for loss in losses)
    miou = [m["sem_seg/mIoU"] for m in metrics if "sem_seg/mIoU" in m]
    assert len(miou) == 1 and 0.0 <= miou[0] <= 100.0  # the evaluation after training
    weights = output / "model_final.pth"
    assert weights.is_file()
    again = run(config, "--eval-only", *opts, "MODEL.WEIGHTS", weights)
    assert again["sem_seg"]["mIoU"] == pytest.approx(miou[0], abs=1e-9)


def test_mask2former_train_net_is_loaded_privately():
    first, second = load_mask2former_train_net(), load_mask2former_train_net()
    assert first is not second
    assert first.main.__code__.co_filename == str(mask2former_root() / "train_net.py")


def test_trainer_uses_algm_optimizer_and_amp_precision(tmp_path):
    from algm_d2.d2.train_net import setup, trainer_class

    train = register_tiny_dataset(tmp_path / "train", "algm_d2_tiny_train", 2)
    args = default_argument_parser().parse_args(
        ["--config-file", str(CONFIGS / "maskformer2_vit_base_merged_tokens_512_algm.yaml")]
        + [repr(v) if isinstance(v, (tuple, list)) else str(v) for v in TINY_ENCODER + TINY_INPUT + TINY_MASK2FORMER + [
            "DATASETS.TRAIN", (train,), "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "bfloat16",
            "OUTPUT_DIR", tmp_path / "out"]])
    trainer = trainer_class(load_mask2former_train_net().Trainer)(setup(args))
    assert trainer._trainer.precision is torch.bfloat16
    groups = trainer.optimizer.param_groups
    assert all("names" in g for g in groups)  # algm_d2's groups, not Mask2Former's one group per parameter
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    assert {"backbone.pos_embed", "backbone.cls_token"} <= no_decay
    args.opts += ["SOLVER.AMP.PRECISION", "int8"]
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        setup(args)
