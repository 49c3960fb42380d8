"""Config: every shipped YAML loads (with _BASE_), errors name the key, overrides and flexible keys."""
from __future__ import annotations

from pathlib import Path

import pytest

from algm_d2.config import get_cfg
from algm_d2.modeling import algm_config_from_cfg, build_model
from algm_d2.merge import FixedLevel

ROOT = Path(__file__).resolve().parents[2]
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


def test_algm_errors_carry_the_field_and_the_translator_names_its_key():
    from algm_d2.merge.config import ALGMConfig, ALGMConfigError

    for kwargs, field in [({"window": (0, 2)}, "window"), ({"batch_policy": "max"}, "batch_policy"),
                          ({"local_threshold": "top:x"}, "local_threshold"), ({"local_layer": 0}, "local_layer"),
                          ({"local_layer": 6, "global_layer": 5}, "global_layer")]:
        with pytest.raises(ALGMConfigError) as caught:
            ALGMConfig(**kwargs)
        assert caught.value.field == field
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ALGM.ENABLED", "True", "MODEL.ALGM.WINDOW", "(1, 1)"])
    with pytest.raises(ValueError, match=r"^MODEL.ALGM.WINDOW: window must be positive"):
        algm_config_from_cfg(cfg)
    cfg.merge_from_list(["MODEL.ALGM.WINDOW", "(2, 2)", "MODEL.ALGM.BATCH_POLICY", "max"])
    with pytest.raises(ValueError, match=r"^MODEL.ALGM.BATCH_POLICY: batch_policy must be one of"):
        algm_config_from_cfg(cfg)


@pytest.mark.parametrize("window", [2, [2], (2, 2, 2), (2.0, 2)])
def test_a_window_is_a_rows_cols_pair_only(window, tmp_path):
    from algm_d2.merge.config import ALGMConfig, ALGMConfigError

    with pytest.raises(ALGMConfigError, match=r"window must be two ints \(rows, cols\)"):
        ALGMConfig(window=window)
    assert ALGMConfig(window=[3, 1]).window == (3, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  ALGM:\n    ENABLED: True\n    WINDOW: 2\n")
    with pytest.raises(ValueError, match="MODEL.ALGM.WINDOW"):
        cfg = get_cfg()
        cfg.merge_from_file(str(bad))
        algm_config_from_cfg(cfg)


def test_the_calibration_file_reads_back_what_the_calibrator_wrote(tmp_path):
    import torch

    from algm_d2.evaluation import save_json
    from algm_d2.merge import ThresholdCalibrator
    from algm_d2.merge.thresholds import read_layer_thresholds

    calibrator = ThresholdCalibrator([1, 5])
    for layer in (1, 5):
        calibrator.observe(layer, torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(layer)))
    result = calibrator.result()
    save_json(str(tmp_path / "tau.json"), result)
    assert read_layer_thresholds(str(tmp_path / "tau.json")) == {
        int(layer): entry["threshold"] for layer, entry in result["layers"].items()}
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ALGM.ENABLED", "True", "MODEL.ALGM.CALIBRATION_FILE", str(tmp_path / "tau.json")])
    assert algm_config_from_cfg(cfg).global_threshold == "batch_stats"  # a string rule is kept
    (tmp_path / "bad.json").write_text('{"layers": {"1": {"mean": 0.5}}}')
    for name in ("bad.json", "missing.json"):
        cfg.MODEL.ALGM.CALIBRATION_FILE = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"^MODEL.ALGM.CALIBRATION_FILE: cannot read per-layer thresholds from "
                                             rf".*{name}"):
            algm_config_from_cfg(cfg)


def test_clip_type_and_norm_type_take_their_one_value_and_name_the_key_otherwise():
    from algm_d2.engine.trainer import deepspeed_config

    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs/ade20k/segvit/segvit_vit_large_atm_640x640_160k.yaml"))  # sets both
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.IMS_PER_BATCH = 2
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and deepspeed_config(cfg, world_size=1)["gradient_clipping"] > 0
    for key, value in (("CLIP_TYPE", "norm"), ("NORM_TYPE", 1.0)):
        bad = cfg.clone()
        bad.merge_from_list([f"SOLVER.CLIP_GRADIENTS.{key}", value])
        with pytest.raises(ValueError, match=rf"SOLVER.CLIP_GRADIENTS.{key} must be .* got {value!r}"):
            deepspeed_config(bad, world_size=1)
        bad.SOLVER.CLIP_GRADIENTS.ENABLED = False  # detectron2's default CLIP_TYPE "value" with clipping off
        assert deepspeed_config(bad, world_size=1)["gradient_clipping"] == 0.0


def test_precisions_are_declared_once():
    import torch

    from algm_d2.config import PRECISIONS, precision_dtype

    assert [precision_dtype(p) for p in PRECISIONS] == [None, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="TEST.PRECISION must be one of fp32, bf16, fp16, got 'fp8'"):
        precision_dtype("fp8", "TEST.PRECISION")
