"""The command-line tools run end to end on tiny CPU models."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tool_on_cpu(tmp_path):
    load_tool("benchmark").main(["--variant", "tiny", "--image-size", "64", "--batch-size", "2", "--num-images", "3",
                                 "--precision", "fp32", "--warmup", "1", "--iters", "4", "--rounds", "2",
                                 "--flops-images", "1", "--device", "cpu", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["results"]) == {"baseline", "algm", "algm_per_image", "paper_level", "level0", "level0_scored"}
    base, level = report["results"]["baseline"], report["results"]["paper_level"]
    mixed = base["protocols"]["mixed"]
    assert mixed["images_per_second"] > 0 and mixed["host_ms_per_batch"] > 0
    assert len(mixed["ms_per_batch_rounds"]) == 2 and mixed["iters"] == 4  # two interleaved rounds of two
    for name in ("level0", "level0_scored"):  # both stages on, nothing merged
        tokens = report["results"][name]["protocols"]["mixed"]["tokens"]
        assert tokens["min_tokens_per_layer"] == [tokens["initial_tokens"]] * len(tokens["min_tokens_per_layer"])
    # 64² → 4x4 grid: the paper's fractions merge 1 of 4 windows (17 → 14 tokens) at layer 1
    assert level["protocols"]["repeat"]["tokens"]["mean_tokens_per_layer"][0] == 14
    assert level["gflops_per_image"] < base["gflops_per_image"]
    assert report["ratios"]["baseline"]["repeat"] == 1.0
    # every round times whole passes over the inputs: 3 images (repeat batches) → 2 iterations round up to 3
    repeat = level["protocols"]["repeat"]
    assert repeat["iters"] == 6 and len(repeat["ms_per_batch_by_input"]) == 3
    assert repeat["ms_per_batch_input_mean"] == pytest.approx(sum(repeat["ms_per_batch_by_input"]) / 3)
    assert repeat["images_per_second"] == pytest.approx(2 / (repeat["ms_per_batch_input_mean"] / 1000))
    mixed_ms = level["protocols"]["mixed"]["ms_per_batch_input_mean"]
    assert report["mixed_over_repeat"]["paper_level"] == pytest.approx(repeat["ms_per_batch_input_mean"] / mixed_ms)
    assert "| paper_level | repeat |" in (tmp_path / "benchmark.md").read_text()


def test_calibration_tool_writes_per_layer_thresholds(tmp_path):
    out = tmp_path / "tau.json"
    load_tool("calibrate_thresholds").main([
        "--config-file", str(ROOT / "configs/demo/segmenter_tiny_algm.yaml"), "--num-images", "4", "--batch-size",
        "2", "--output", str(out), "DATALOADER.NUM_WORKERS", "0", "MODEL.BACKBONE.EMBED_DIM", "64",
        "MODEL.BACKBONE.NUM_HEADS", "2"])
    layers = json.loads(out.read_text())["layers"]
    assert set(layers) == {"1", "3"} and all(v["images"] == 4 for v in layers.values())


def test_decode_tail_tool_on_cpu(tmp_path):
    out = tmp_path / "tail.json"
    load_tool("benchmark_decode_tail").main(["--device", "cpu", "--dtypes", "fp32", "--layouts", "nhwc", "--kinds",
                                             "smooth", "--warmup", "1", "--iters", "2", "--copy-mb", "4",
                                             "--upsample", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["identical"] == 1.0 and row["upsample"]["identical"]
    assert row["upsample"]["upsample_bilinear"]["ms"] > 0 and row["upsample"]["floor_ms"] > 0


def test_msda_tool_on_cpu(tmp_path):
    out = tmp_path / "msda.json"
    load_tool("benchmark_msda").main(["--device", "cpu", "--tiny", "--warmup", "1", "--iters", "2", "--out", str(out)])
    (row,) = json.loads(out.read_text())["shapes"].values()
    assert row["reference_forward_ms"] > 0 and row["reference_forward_backward_ms"] > 0
    assert "triton_forward_ms" not in row  # the Triton kernels run on CUDA only


def test_benchmark_tools_offer_the_librarys_choices():
    """The tools name their choices without importing torch (for --help); they are the library's."""
    import torch

    from algm_d2.config import PRECISIONS, precision_dtype
    from algm_d2.evaluation.benchmark import OUTPUTS, PROTOCOLS
    from algm_d2.modeling import SEGMENTER_VARIANTS

    benchmark, eva, tail = load_tool("benchmark"), load_tool("benchmark_eva"), load_tool("benchmark_decode_tail")
    assert set(benchmark.VARIANTS) == set(SEGMENTER_VARIANTS)
    assert set(benchmark.PRECISION_NAMES) == set(eva.PRECISION_NAMES) == set(tail.DTYPES) == set(PRECISIONS)
    assert benchmark.PROTOCOLS == PROTOCOLS and benchmark.OUTPUTS == OUTPUTS
    assert {name: getattr(torch, dtype) for name, dtype in tail.DTYPES.items()} == {
        name: precision_dtype(name) or torch.float32 for name in PRECISIONS}
