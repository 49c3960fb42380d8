"""Config: every shipped YAML loads (with _BASE_), errors name the key, overrides and flexible keys."""
from __future__ import annotations

from pathlib import Path

import pytest

from algm_d2.config import get_cfg
from algm_d2.modeling import algm_config_from_cfg, build_model
from algm_d2.merge import FixedLevel

ROOT = Path(__file__).resolve().parents[1]
# configs/detectron2 holds detectron2 + Mask2Former configs (loaded by tests/d2 with detectron2's config)
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                 if "detectron2" not in p.relative_to(ROOT / "configs").parts[:1])


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads(path):
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / path))
    algm_config_from_cfg(cfg)
    if "segmenter_vit_tiny" in path or "demo" in path:
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        assert model.net.backbone.depth == cfg.MODEL.BACKBONE.DEPTH


def test_base_inheritance_and_paper_settings():
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs/ade20k/segmenter/segmenter_vit_large_mask_640x640_160k_algm.yaml"))
    assert cfg.SOLVER.BASE_LR == 0.001 and cfg.SOLVER.MAX_ITER == 160000  # from Base-ADE20K-150.yaml
    assert cfg.INPUT.CROP_SIZE == (640, 640) and cfg.MODEL.BACKBONE.DEPTH == 24  # from the baseline file
    algm = algm_config_from_cfg(cfg)
    assert (algm.local_layer, algm.global_layer, algm.window) == (1, 7, (2, 2))
    assert algm.local_threshold == 0.88 and algm.global_threshold == "batch_stats"


def test_unknown_keys_and_wrong_types_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_BASE_: '%s'\nMODEL:\n  ALGM:\n    LOCAL_LAYERS: 2\n" % (ROOT / "configs/demo/Base-Demo.yaml"))
    with pytest.raises(KeyError, match="MODEL.ALGM.LOCAL_LAYERS"):
        get_cfg().merge_from_file(str(bad))
    with pytest.raises(ValueError, match="SOLVER.MAX_ITER"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER", "'many'"])
    with pytest.raises(ValueError, match="MODEL.ALGM.GLOBAL_THRESHOLD"):
        get_cfg().merge_from_list(["MODEL.ALGM.GLOBAL_THRESHOLD", "[1, 2]"])
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER"])


def test_flexible_threshold_keys_and_int_for_float():
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ALGM.ENABLED", "True", "MODEL.ALGM.LOCAL_THRESHOLD", "top:64",
                         "MODEL.ALGM.GLOBAL_THRESHOLD", "0.7", "SOLVER.BASE_LR", "1"])
    algm = algm_config_from_cfg(cfg)
    assert algm.local_threshold == FixedLevel(count=64) and algm.global_threshold == 0.7
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    cfg.merge_from_list(["MODEL.ALGM.GLOBAL_THRESHOLD", "None"])
    assert not algm_config_from_cfg(cfg).global_active


def test_calibration_file_replaces_float_thresholds(tmp_path):
    path = tmp_path / "tau.json"
    path.write_text('{"layers": {"1": {"threshold": 0.61}, "5": {"threshold": 0.42}}}')
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ALGM.ENABLED", "True", "MODEL.ALGM.CALIBRATION_FILE", str(path),
                         "MODEL.ALGM.GLOBAL_THRESHOLD", "0.9"])
    algm = algm_config_from_cfg(cfg)
    assert algm.local_threshold == 0.61 and algm.global_threshold == 0.42
    cfg.MODEL.ALGM.GLOBAL_LAYER = 7
    with pytest.raises(ValueError, match="no threshold for layer 7"):
        algm_config_from_cfg(cfg)
