"""The evaluation loop: mIoU family, images/s, GFLOPs (per crop and per image) and ALGM's kept-token ratios."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn
from tqdm import tqdm

from ..data import build_test_loader, get_metadata
from ..evaluation import InferenceTimer, MergeStatsAccumulator, SemSegEvaluator, count_gflops, save_json
from .defaults import get_rank

logger = logging.getLogger(__name__)


def inference_on_dataset(model: nn.Module, loader, evaluator: SemSegEvaluator, *,  # noqa: ANN001 - a DataLoader
                         merge_stats: MergeStatsAccumulator, timer: InferenceTimer) -> Dict[str, Any]:
    """Run ``model`` over ``loader`` (this rank's share) and reduce the metrics over all ranks."""
    evaluator.reset()
    merge_stats.reset()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=get_rank() != 0, mininterval=10):
            with timer.time_batch(len(batch)):
                outputs = model(batch)
            evaluator.process(batch, outputs)
            merge_stats.update(model.merge_stats)
    model.train(was_training)
    results = evaluator.evaluate()
    results["speed"] = timer.summary()
    results["tokens"] = merge_stats.summary()
    return results


def count_dataset_gflops(model: nn.Module, loader, num_images: int) -> Dict[str, float]:  # noqa: ANN001
    """Mean GFLOPs per image (all crops of the test-time inference) and per crop over the first images."""
    per_image, per_crop = [], []
    was_training = model.training
    model.eval()
    for index, batch in enumerate(loader):
        if index >= num_images:
            break
        for item in batch:
            gflops = count_gflops(model, [item])["gflops"]
            counts = model.merge_stats["tokens_per_layer"]
            per_image.append(gflops)
            per_crop.append(gflops / max(1, len(counts[0]) if counts else 1))
    model.train(was_training)
    if not per_image:
        return {}
    return {"gflops_per_image": sum(per_image) / len(per_image), "gflops_per_crop": sum(per_crop) / len(per_crop),
            "images": len(per_image)}


def evaluate(cfg, model: nn.Module, gathered_parameters=None) -> Dict[str, Dict[str, Any]]:  # noqa: ANN001
    """Evaluate on every DATASETS.TEST; results printed, and saved to OUTPUT_DIR/inference/results.json (rank 0).

    ``gathered_parameters``: a context manager that makes all parameters whole on every rank (ZeRO-3).
    """
    all_results: Dict[str, Dict[str, Any]] = {}
    device = next(model.parameters()).device
    for name in cfg.DATASETS.TEST:
        metadata = get_metadata(name)
        output_dir = str(Path(cfg.OUTPUT_DIR) / "inference" / name)
        evaluator = SemSegEvaluator.from_config(cfg, class_names=metadata.stuff_classes, output_dir=output_dir)
        loader = build_test_loader(cfg, name)
        timer = InferenceTimer(warmup_batches=cfg.TEST.TIMER_WARMUP_BATCHES, device=device)
        with gathered_parameters() if gathered_parameters else nullcontext():
            results = inference_on_dataset(model, loader, evaluator, merge_stats=MergeStatsAccumulator.from_config(cfg),
                                           timer=timer)
            if cfg.TEST.COMPUTE_FLOPS and get_rank() == 0:
                results["flops"] = count_dataset_gflops(model, build_test_loader(cfg, name, rank=0, world_size=1),
                                                        cfg.TEST.FLOPS_NUM_IMAGES)
        all_results[name] = results
        if get_rank() == 0:
            logger.info("%s", summary_lines(name, results))
    if get_rank() == 0:
        save_json(str(Path(cfg.OUTPUT_DIR) / "inference" / "results.json"), all_results)
    return all_results


def summary_lines(name: str, results: Dict[str, Any]) -> str:
    """The headline numbers of one dataset: mIoU, images/s, GFLOPs and kept-token ratios after the ALGM layers."""
    metrics = results["sem_seg"]
    lines = [f"Evaluation on {name}:",
             "  mIoU {:.2f}  fwIoU {:.2f}  mACC {:.2f}  pACC {:.2f}".format(
                 metrics["mIoU"], metrics["fwIoU"], metrics["mACC"], metrics["pACC"]),
             "  images/s {:.2f} ({} images timed on rank 0)".format(
                 results["speed"].get("images_per_second") or 0.0, results["speed"].get("images", 0))]
    flops = results.get("flops")
    if flops:
        lines.append("  GFLOPs {:.3f} per image, {:.3f} per crop (fvcore multiply-adds, attention included)".format(
            flops["gflops_per_image"], flops["gflops_per_crop"]))
    layers = results["tokens"].get("algm_layers") or {}
    for label, entry in layers.items():
        lines.append("  tokens kept after {}: {:.1%}".format(label, entry["kept_ratio"]))
    final = results["tokens"].get("final")
    if final:
        lines.append("  tokens kept after the last block: {:.1%}".format(final["kept_ratio"]))
    return "\n".join(lines)
