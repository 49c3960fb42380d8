"""The shipped YAML configs: the releases' recipes, and the `_algm` variants differ from their baselines only in
MODEL.ALGM."""
from __future__ import annotations

from pathlib import Path

import pytest

from algm_d2.config import get_cfg

ROOT = Path(__file__).resolve().parents[2]


SEGMENTER_CONFIGS = sorted((ROOT / "configs/ade20k/segmenter").glob("*_algm.yaml"))


def _load(path: Path):
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    return cfg


@pytest.mark.parametrize("algm_config", SEGMENTER_CONFIGS, ids=lambda p: p.stem)
def test_segmenter_configs_have_the_release_recipe_and_differ_only_in_algm(algm_config):
    cfg = _load(algm_config)
    baseline = _load(algm_config.with_name(algm_config.name.replace("_algm", "")))
    solver = cfg.SOLVER  # segm/train.py + segm/config.yml of the release: SGD (timm: Nesterov), poly 0.9
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.MOMENTUM, solver.NESTEROV, solver.WEIGHT_DECAY) == \
        ("SGD", 0.001, 0.9, True, 0.0)
    assert (solver.LR_SCHEDULER, solver.POLY_POWER, solver.MIN_LR, solver.WARMUP_ITERS) == ("poly", 0.9, 1e-5, 0)
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER) == (8, 160000)
    large = "large" in algm_config.name
    assert cfg.INPUT.CROP_SIZE == ((640, 640) if large else (512, 512)) and cfg.TEST.MODE == "slide"
    algm = cfg.MODEL.ALGM
    assert (algm.ENABLED, algm.LOCAL_LAYER, algm.GLOBAL_LAYER, tuple(algm.WINDOW)) == \
        (True, 1, 7 if large else 5, (2, 2))
    assert (algm.LOCAL_THRESHOLD, algm.GLOBAL_THRESHOLD, algm.BATCH_POLICY) == (0.88, "batch_stats", "min")
    assert not baseline.MODEL.ALGM.ENABLED
    cfg.MODEL.ALGM = baseline.MODEL.ALGM
    cfg.OUTPUT_DIR = baseline.OUTPUT_DIR
    assert cfg.dump() == baseline.dump()
