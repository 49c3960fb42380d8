"""format_results_table (markdown) and save_json (atomic, strict JSON); the evaluation-reporting config keys."""
import json
import os

import numpy as np
import pytest
import torch

from algm_d2.config import get_cfg
from algm_d2.evaluation import format_results_table, save_json

RESULTS = {
    "sem_seg": {"mIoU": 52.22222, "IoU-road": 40.0, "IoU-tree": float("nan"), "pACC": 62.5, "ACC-road": 50.0,
                "ACC-tree": float("nan")},
    "speed": {"images_per_second": 12.345, "device": "cpu", "peak_memory_mb": None,
              "final": {"layer": 12, "kept_ratios": [0.5, 0.25]}},
}


def test_format_results_table():
    assert format_results_table(RESULTS, digits=1) == (
        "**sem_seg**\n\n| metric | value |\n|---|---|\n| mIoU | 52.2 |\n| pACC | 62.5 |\n\n"
        "**speed**\n\n| metric | value |\n|---|---|\n| images_per_second | 12.3 |\n| device | cpu |\n"
        "| peak_memory_mb | - |\n| final.layer | 12 |\n| final.kept_ratios | 0.5, 0.2 |\n"
    )
    per_class = format_results_table(RESULTS, per_class=True)
    assert "| class | IoU | ACC |\n|---|---|---|\n| road | 40.00 | 50.00 |\n| tree | nan | nan |\n" in per_class


def test_save_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / "out" / "results.json"
    save_json(str(path), {"a": float("nan"), "b": np.float32(0.5), "c": np.arange(3), "d": torch.tensor([1, 2]),
                          "e": (np.int64(4), float("inf")), 5: "five"})
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5, "c": [0, 1, 2], "d": [1, 2], "e": [4, None],
                                            "5": "five"}
    save_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError, match="object"):
        save_json(str(path), {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file is intact
    assert os.listdir(path.parent) == ["results.json"]


def test_save_json_removes_its_temporary_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    save_json(str(path), {"a": 1})

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        save_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_evaluation_reporting_config_keys():
    test = get_cfg().TEST
    assert (test.COMPUTE_FLOPS, test.FLOPS_BACKEND) == (False, "fvcore")
    assert (test.FLOPS_NUM_IMAGES, test.TIMER_WARMUP_BATCHES, test.MERGE_STATS) == (20, 5, True)
    # the benchmark tools take their sizes and iterations on their command lines, not from a config
    for dead in ("FLOPS_IMAGE_SIZE", "BENCHMARK_BATCH_SIZE", "BENCHMARK_WARMUP_ITERS", "BENCHMARK_ITERS"):
        assert dead not in test
