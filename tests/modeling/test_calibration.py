"""The paper's τ = μ + σ calibration over a model's tokens (algm_d2.analysis.calibration)."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from algm_d2 import ALGMConfig, apply_algm
from algm_d2.analysis.calibration import calibrate_thresholds


def test_calibration_gives_json_thresholds():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, embed_dim=48,
                            depth=4, num_heads=3).eval()
    wrapper = apply_algm(vit, ALGMConfig(global_layer=3))
    batches = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    result = calibrate_thresholds(wrapper, batches, [1, 3], max_images=5, progress=False)
    json.dumps(result)
    assert set(result["layers"]) == {"1", "3"}
    assert result["layers"]["1"]["images"] == 5
    for stats in result["layers"].values():
        assert -1 <= stats["mean"] <= 1 and stats["threshold"] == pytest.approx(stats["mean"] + stats["std"])
