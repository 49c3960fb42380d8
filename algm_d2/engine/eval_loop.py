"""The evaluation loop: mIoU family, images/s, GFLOPs (per image and per crop) and ALGM's kept-token ratios."""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..config import precision_dtype
from ..data import build_test_loader, get_metadata, register_datasets_from_config
from ..evaluation import InferenceTimer, MergeStatsAccumulator, SemSegEvaluator, count_gflops, save_json
from .defaults import get_rank

logger = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


def inference_on_dataset(model: nn.Module, loader: torch.utils.data.DataLoader, evaluator: SemSegEvaluator, *,
                         timer: InferenceTimer, merge_stats: Optional[MergeStatsAccumulator] = None,
                         precision: str = "fp32") -> Dict[str, Any]:
    """Run ``model`` in eval mode over this rank's share of a test set; metrics are reduced over all ranks.
    ``precision`` "bf16"/"fp16" runs the model under autocast (TEST.PRECISION).

    Returns the evaluator's results plus "speed" (this rank's images/s) and, given ``merge_stats``, "tokens"."""
    evaluator.reset()
    if merge_stats is not None:
        merge_stats.reset()
    was_training = model.training
    model.eval()
    dtype = precision_dtype(precision, "TEST.PRECISION")
    device_type = next(model.parameters()).device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for batch in tqdm(loader, desc="evaluating", unit="batch", disable=get_rank() != 0, mininterval=10):
            with timer.time_batch(len(batch)):
                # the evaluator needs labels only: a model that predicts them directly skips [K, H, W] probabilities
                outputs = model.predict_labels(batch) if hasattr(model, "predict_labels") else model(batch)
            evaluator.process(batch, outputs)
            if merge_stats is not None:
                merge_stats.update(model.merge_stats)
    model.train(was_training)
    results = evaluator.evaluate()
    results["speed"] = timer.summary()
    if merge_stats is not None:
        results["tokens"] = merge_stats.summary()
    return results


def count_dataset_gflops(model: nn.Module, loader: torch.utils.data.DataLoader, *, num_images: int,
                         backend: str) -> Dict[str, Any]:
    """Mean GFLOPs (fvcore multiply-adds) per image and per network forward ("crop": sliding-window inference runs
    several per image) over the first ``num_images`` images of ``loader``; ALGM's count depends on the image."""
    per_image: List[float] = []
    crops = 0
    was_training = model.training
    model.eval()
    for batch in loader:
        for item in batch:
            per_image.append(count_gflops(model, [item], backend=backend)["gflops"])
            counts = model.merge_stats.get("tokens_per_layer") if hasattr(model, "merge_stats") else None
            crops += len(counts[0]) if counts else 1
            if len(per_image) == num_images:
                break
        if len(per_image) == num_images:
            break
    model.train(was_training)
    if not per_image:
        return {}
    return {"gflops_per_image": sum(per_image) / len(per_image), "gflops_per_crop": sum(per_image) / crops,
            "images": len(per_image), "crops": crops, "backend": backend}


def evaluate(cfg, model: nn.Module, *,  # noqa: ANN001 - a CfgNode
             gathered_parameters: Optional[Callable[[], ContextManager[None]]] = None) -> Dict[str, Dict[str, Any]]:
    """Evaluate ``model`` on every DATASETS.TEST (collective: every rank takes its share). Rank 0 logs a results
    table and writes OUTPUT_DIR/inference/results.json.

    ``gathered_parameters``: a context manager that makes every parameter whole on every rank (ZeRO-3).
    """
    all_results: Dict[str, Dict[str, Any]] = {}
    device = next(model.parameters()).device
    register_datasets_from_config(cfg)  # --eval-only reaches here first: the metadata of DATASETS.CUSTOM is read below
    for name in cfg.DATASETS.TEST:
        evaluator = SemSegEvaluator.from_config(cfg, class_names=get_metadata(name).stuff_classes,
                                                output_dir=str(Path(cfg.OUTPUT_DIR) / "inference" / name))
        timer = InferenceTimer(warmup_batches=cfg.TEST.TIMER_WARMUP_BATCHES, device=device)
        merge_stats = MergeStatsAccumulator.for_model(model) if cfg.TEST.MERGE_STATS else None
        with gathered_parameters() if gathered_parameters is not None else nullcontext():
            loader = build_test_loader(cfg, name)
            results = inference_on_dataset(model, loader, evaluator, timer=timer, merge_stats=merge_stats,
                                           precision=cfg.TEST.PRECISION)
            if math.isnan(results["sem_seg"]["mIoU"]):
                raise RuntimeError(f"evaluation of {name}: no labelled pixel was evaluated "
                                   f"({loader.dataset.num_skipped} images skipped as unreadable on rank 0, see the "
                                   "warnings); no mIoU to report")
            if cfg.TEST.COMPUTE_FLOPS and get_rank() == 0:
                results["flops"] = count_dataset_gflops(
                    model, build_test_loader(cfg, name, rank=0, world_size=1, num_workers=0),
                    num_images=cfg.TEST.FLOPS_NUM_IMAGES, backend=cfg.TEST.FLOPS_BACKEND)
        all_results[name] = results
    if get_rank() == 0 and all_results:
        logger.info("evaluation results (all in %s):\n%s", Path(cfg.OUTPUT_DIR) / "inference" / RESULTS_FILE,
                    results_table(all_results))
        save_json(str(Path(cfg.OUTPUT_DIR) / "inference" / RESULTS_FILE), all_results)
    return all_results


def results_table(all_results: Dict[str, Dict[str, Any]]) -> str:
    """One markdown row per dataset: mIoU, fwIoU, mACC, pACC, images/s, GFLOPs and the share of patch tokens kept
    after each ALGM layer."""
    token_layers = sorted({entry["layer"] for results in all_results.values()
                           for entry in results.get("tokens", {}).get("algm_layers", {}).values()})
    header = ["dataset", "mIoU", "fwIoU", "mACC", "pACC", "images/s", "GFLOPs/image", "GFLOPs/crop",
              *[f"tokens kept after layer {layer}" for layer in token_layers]]
    rows = []
    for name, results in all_results.items():
        metrics, flops = results["sem_seg"], results.get("flops") or {}
        kept = {entry["layer"]: entry["kept_ratio"]
                for entry in results.get("tokens", {}).get("algm_layers", {}).values()}
        rows.append([name, *(f"{metrics[key]:.2f}" for key in ("mIoU", "fwIoU", "mACC", "pACC")),
                     _number(results["speed"].get("images_per_second"), "{:.2f}"),
                     _number(flops.get("gflops_per_image"), "{:.3f}"), _number(flops.get("gflops_per_crop"), "{:.3f}"),
                     *(_number(kept.get(layer), "{:.1%}") for layer in token_layers)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
