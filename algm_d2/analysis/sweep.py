"""Figure 4: mIoU, images/s and GFLOPs of one trained model over a range of inference thresholds τ, and ALGM*,
the smallest τ whose mIoU is not below the model without merging."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

from tqdm import tqdm

from ..data import build_test_loader, get_metadata
from ..engine.eval_loop import count_dataset_gflops, inference_on_dataset
from ..evaluation import InferenceTimer, MergeStatsAccumulator, SemSegEvaluator
from ..merge import OFF, ALGMConfig
from ..modeling import SegmentationModel, algm_config_from_cfg

STAGES = ("both", "local", "global")


def with_threshold(config: ALGMConfig, tau: float, stage: str) -> ALGMConfig:
    """``config`` with τ as the rule of the chosen active stage(s)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    changes = {}
    if stage in ("both", "local") and config.local_active:
        changes["local_threshold"] = float(tau)
    if stage in ("both", "global") and config.global_active:
        changes["global_threshold"] = float(tau)
    if not changes:
        raise ValueError(f"no active ALGM stage to sweep for stage={stage!r} (is MODEL.ALGM.ENABLED True?)")
    return dataclasses.replace(config, **changes)


def evaluate_setting(cfg, model: SegmentationModel, algm: ALGMConfig, dataset: str, *,  # noqa: ANN001
                     flops_images: int) -> Dict[str, Any]:
    """mIoU, images/s, GFLOPs per image and mean patch tokens kept after each layer of ``model`` under ``algm``."""
    model.net.set_algm(algm)
    evaluator = SemSegEvaluator.from_config(cfg, class_names=get_metadata(dataset).stuff_classes)
    timer = InferenceTimer(warmup_batches=cfg.TEST.TIMER_WARMUP_BATCHES, device=model.device)
    stats = MergeStatsAccumulator()
    results = inference_on_dataset(model, build_test_loader(cfg, dataset), evaluator, timer=timer,
                                   merge_stats=stats, precision=cfg.TEST.PRECISION)
    row = {"mIoU": results["sem_seg"]["mIoU"], "images_per_second": results["speed"]["images_per_second"],
           "tokens": results.get("tokens")}
    if flops_images > 0:
        flops = count_dataset_gflops(model, build_test_loader(cfg, dataset, rank=0, world_size=1, num_workers=0),
                                     num_images=flops_images, backend=cfg.TEST.FLOPS_BACKEND)
        row["gflops"] = flops.get("gflops_per_image")
    return row


def algm_star(rows: Sequence[Dict[str, Any]], baseline_miou: float) -> Optional[Dict[str, Any]]:
    """The row of the smallest τ whose mIoU is not below ``baseline_miou`` (None if no τ reaches it)."""
    good = [row for row in rows if row["mIoU"] >= baseline_miou]
    return min(good, key=lambda row: row["tau"]) if good else None


def sweep_thresholds(cfg, model: SegmentationModel, thresholds: Sequence[float], *,  # noqa: ANN001
                     stage: str = "both", dataset: Optional[str] = None, flops_images: int = 0) -> Dict[str, Any]:
    """Evaluate the model without merging, with its configured ALGM, and with each τ (lowest first)."""
    dataset = dataset or cfg.DATASETS.TEST[0]
    configured = algm_config_from_cfg(cfg)
    taus = sorted(float(t) for t in thresholds)
    rows: List[Dict[str, Any]] = []
    try:
        baseline = evaluate_setting(cfg, model, OFF, dataset, flops_images=flops_images)
        trained = evaluate_setting(cfg, model, configured, dataset, flops_images=flops_images)
        for tau in tqdm(taus, desc="threshold sweep", unit="tau"):
            row = evaluate_setting(cfg, model, with_threshold(configured, tau, stage), dataset,
                                   flops_images=flops_images)
            rows.append({"tau": tau, **row})
    finally:
        model.net.set_algm(configured)
    return {"dataset": dataset, "stage": stage, "baseline": baseline, "configured": trained,
            "configured_rules": {"local": str(configured.local_threshold), "global": str(configured.global_threshold)},
            "sweep": rows, "algm_star": algm_star(rows, baseline["mIoU"])}
