"""What the default path (``build_model(cfg)``, ``load_model``, ``--eval-only``) does for speed without a flag:
fused labels in evaluation, block graphs on (they never capture on the CPU or in training), plan-free attention
kernels for merged sequences, pinned batches only for a CUDA device."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from algm_d2.checkpoint import build_from_variant
from algm_d2.config import get_cfg
from algm_d2.evaluation import SemSegEvaluator
from algm_d2.merge import ALGMConfig
from algm_d2.modeling import SegmentationModel
from algm_d2.modeling.ops.attention_kernels import dynamic_length_attention

ROOT = Path(__file__).resolve().parents[2]


def segmenter(algm: ALGMConfig, classes: int = 5):
    torch.manual_seed(0)
    net = build_from_variant({"net_kwargs": {"image_size": (64, 64), "patch_size": 16, "d_model": 64, "n_heads": 2,
                                             "n_layers": 4, "n_cls": classes,
                                             "decoder": {"name": "mask_transformer", "n_layers": 1}}}).eval()
    net.set_algm(algm)
    return net


ALGM = ALGMConfig(local_layer=1, global_layer=2, local_threshold=0.2, global_threshold="batch_stats",
                  batch_policy="min")


def uint8_images(count: int, height: int, width: int):
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8)
    images[0, :, : height // 2] = 128  # a flat half merges
    return images


@pytest.mark.parametrize("mode, size, output", [("whole", (64, 96), None), ("whole", (64, 96), (50, 70)),
                                                ("slide", (64, 112), (70, 120))])
@pytest.mark.parametrize("fused", [True, False])
def test_predicted_labels_equal_the_argmax_of_the_probabilities(mode, size, output, fused):
    model = SegmentationModel(net=segmenter(ALGM), pixel_mean=[120.0, 110.0, 100.0], pixel_std=[60.0, 60.0, 60.0],
                              test_mode=mode, crop_size=64, stride=48, fused_labels=fused).eval()
    inputs = [{"image": image} for image in uint8_images(2, *size)]
    if output is not None:
        for x in inputs:
            x["height"], x["width"] = output
    probabilities = model(inputs)
    labels = model.predict_labels(inputs)
    for prob, label in zip(probabilities, labels):
        assert label["sem_seg_labels"].dtype == torch.long
        assert torch.equal(label["sem_seg_labels"], prob["sem_seg"].argmax(0))
    assert model.merge_stats["tokens_per_layer"]  # the merges are still counted


def test_the_evaluator_takes_labels_or_scores_alike():
    scores = torch.randn(2, 3, 4, 5)
    gt = torch.randint(0, 3, (2, 4, 5))
    inputs = [{"sem_seg": g, "file_name": f"{i}.png"} for i, g in enumerate(gt)]
    results = []
    for outputs in ([{"sem_seg": s} for s in scores], [{"sem_seg_labels": s.argmax(0)} for s in scores]):
        evaluator = SemSegEvaluator(class_names=["a", "b", "c"], ignore_label=255)
        evaluator.reset()
        evaluator.process(inputs, outputs)
        results.append(evaluator.evaluate()["sem_seg"])
    assert results[0] == results[1]
    evaluator = SemSegEvaluator(class_names=["a", "b", "c"], ignore_label=255)
    evaluator.reset()
    with pytest.raises(ValueError, match="0.png.*sem_seg_labels.*integer"):
        evaluator.process(inputs[:1], [{"sem_seg_labels": scores[0, 0]}])


def test_the_configs_default_to_fused_labels_and_block_graphs():
    cfg = get_cfg()
    assert cfg.TEST.FUSED_LABELS and cfg.MODEL.BACKBONE.CUDA_GRAPHS
    net = segmenter(ALGM)
    assert net.backbone.block_graphs is not None  # load_model / build_from_variant: on by default
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        net(x)
    assert len(net.backbone.block_graphs) == 0 and net.backbone.block_graphs.captures == 0  # never on the CPU


def test_merged_sequences_avoid_plan_building_attention_kernels():
    """cuDNN's SDPA builds a plan per new shape: off while ALGM runs, as it was outside, and the caller's own
    restrictions stay."""
    seen = []
    net = segmenter(ALGM)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    observer = lambda layer, x, state: seen.append(  # noqa: E731 - a probe
        (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
    with torch.no_grad():
        net.backbone(torch.randn(2, 3, 64, 64), observer=observer)
    assert seen and all(flags == (False, True) for flags in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with dynamic_length_attention(False):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        with dynamic_length_attention():
            assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(True)


def test_the_plan_free_context_does_not_change_cpu_results():
    q = torch.randn(2, 3, 17, 8)
    plain = F.scaled_dot_product_attention(q, q, q)
    with dynamic_length_attention():
        assert torch.equal(F.scaled_dot_product_attention(q, q, q), plain)


def test_the_merge_package_imports_torch_only():
    """algm_d2.merge is the method, framework-free: nothing but the standard library, torch and itself."""
    allowed = {"torch", "__future__", "dataclasses", "typing", "math", "json", "logging", "collections",
               "functools", "itertools", "pathlib", "enum", "numbers", "contextlib"}
    for path in sorted((ROOT / "algm_d2" / "merge").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
