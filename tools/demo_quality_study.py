#!/usr/bin/env python
"""A quality check that needs no download: Seg-T and Seg-S (plain ViT + mask transformer) trained from scratch on
the procedural demo shapes until the validation mIoU stops improving, then evaluated without merging and with ALGM
training-free (the release's rules), with the calibrated τ = μ + σ, fine-tuned with ALGM, and as ALGM* (the
smallest τ whose mIoU is not below the plain model's). Each row: mIoU, images/s, GFLOPs per image and the share of
patch tokens kept. These are demo-data numbers, not ADE20K ones.

  python tools/demo_quality_study.py --device cuda --output-dir output/demo_quality
  python tools/demo_quality_study.py --device cpu --smoke --output-dir /tmp/quality   # a few iterations, tiny models

Writes <output-dir>/quality_study.json and quality_study.md (one table per model) and prints the tables. Per model
<output-dir>/<model>/ holds the training runs (metrics.json, model_best.pth of the plain and the fine-tuned run),
config.yaml and calibrated.yaml (the τ = μ + σ thresholds on top of it). The data are rendered at --crop pixels,
so the encoder sees a (crop / 16)² grid: at 256², 16×16 patches, 8×8 CLAP windows of 2×2 inside shapes that span
5-10 patches, the regime ALGM's windows are made for (at the builtin 128² the grid is 8×8 and a 2×2 window is a
quarter of a shape's side).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("demo_quality_study")

# Segmenter's ViT sizes (the paper's Seg-T / Seg-S): 12 blocks of 16x16 patches, mask transformer of 2 layers
MODELS = {"tiny": {"name": "Seg-T", "EMBED_DIM": 192, "NUM_HEADS": 3},
          "small": {"name": "Seg-S", "EMBED_DIM": 384, "NUM_HEADS": 6}}
DEPTH = 12
# --smoke: every model shrunk to this (GBM's layer 5 still inside the encoder)
SMOKE_ARCH = {"EMBED_DIM": 32, "NUM_HEADS": 2, "DEPTH": 6}
SWEEP_TAUS = (0.75, 0.80, 0.85, 0.88, 0.90, 0.93, 0.96)
ROW_FIELDS = ("setting", "local_rule", "global_rule", "mIoU", "delta_mIoU", "images_per_second", "gflops",
              "kept_tokens_mean", "kept_tokens_final")
# a loss beyond this (mIoU points) is flagged in the tables: it needs an explanation before the numbers are used
FLAG_MIOU_LOSS = 1.0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--output-dir", default="output/demo_quality")
    parser.add_argument("--crop", type=int, default=256, help="image and crop side in pixels (a multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="training images per iteration")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="training and inference precision (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--max-iter", type=int, default=1500, help="most iterations of the plain training")
    parser.add_argument("--eval-period", type=int, default=100, help="evaluate every this many iterations")
    parser.add_argument("--patience", type=int, default=3,
                        help="stop after this many evaluations without a better validation mIoU")
    parser.add_argument("--max-train-minutes", type=float, default=1.5,
                        help="also stop the plain training at the first evaluation after this many minutes")
    parser.add_argument("--finetune-iter", type=int, default=200,
                        help="iterations of the ALGM fine-tuning from the best plain weights")
    parser.add_argument("--base-lr", type=float, default=5e-4)
    parser.add_argument("--num-train", type=int, default=4000, help="demo training images")
    parser.add_argument("--num-val", type=int, default=200, help="demo validation images")
    parser.add_argument("--calibration-images", type=int, default=256, help="training crops for τ = μ + σ")
    parser.add_argument("--flops-images", type=int, default=4, help="validation images whose GFLOPs are counted")
    parser.add_argument("--taus", type=float, nargs="+", default=list(SWEEP_TAUS), help="τ of the ALGM* sweep")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers (default: 12 on cuda, 0 on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models and data, a few iterations; overrides the size and schedule options "
                             "(checks the pipeline, its numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.crop, args.batch_size, args.max_iter, args.eval_period, args.patience = 64, 4, 4, 2, 1
        args.finetune_iter, args.num_train, args.num_val, args.calibration_images = 2, 16, 2, 4
        args.flops_images, args.taus = 1, args.taus[:2]
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.num_workers is None:
        args.num_workers = 12 if args.device == "cuda" else 0
    if args.crop % 32:
        parser.error(f"--crop {args.crop}: must be a multiple of 32 (16-pixel patches in 2x2 windows)")
    if min(args.max_iter, args.eval_period, args.patience, args.finetune_iter) < 1:
        parser.error("--max-iter, --eval-period, --patience and --finetune-iter must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # imported after parsing, so that --help does not wait for torch and DeepSpeed
    from algm_d2.engine import launch

    study: Dict[str, Any] = {}
    launch(run_study, 1, args=(args, study), backend="nccl" if args.device == "cuda" else "gloo")
    return study


def run_study(args: argparse.Namespace, study: Dict[str, Any]) -> None:
    """Every model of ``args.models`` in turn (one process: the run's group); fills ``study`` and writes it."""
    import torch

    out = Path(args.output_dir)
    datasets = register_study_datasets(args)
    study.update(settings=study_settings(args, datasets), models={})
    start = time.monotonic()
    for key in args.models:
        study["models"][key] = study_model(args, key, datasets, out / key)
        gc.collect()  # the finished model's DeepSpeed engine and loaders, before the next model's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    study["wall_seconds"] = time.monotonic() - start
    write_study(study, out)


def register_study_datasets(args: argparse.Namespace) -> Dict[str, str]:
    """The demo splits rendered at ``--crop`` pixels, registered as demo_shapes_<split>_<crop>px_<count>."""
    from algm_d2.data.catalog import DatasetMetadata, register_dataset
    from algm_d2.data.demo import DEMO_SHAPES_CLASSES, DEMO_SHAPES_COLORS, DemoShapes

    metadata = DatasetMetadata(stuff_classes=DEMO_SHAPES_CLASSES, stuff_colors=DEMO_SHAPES_COLORS)
    names = {}
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        names[split] = f"demo_shapes_{split}_{args.crop}px_{count}"
        register_dataset(names[split], DemoShapes(split=split, num_images=count, image_size=args.crop,
                                                  seed=args.seed), metadata)
    return names


def study_settings(args: argparse.Namespace, datasets: Dict[str, str]) -> Dict[str, Any]:
    return {"device": args.device, "precision": args.precision, "crop": args.crop,
            "grid": [args.crop // 16, args.crop // 16], "batch_size": args.batch_size, "max_iter": args.max_iter,
            "eval_period": args.eval_period, "patience": args.patience,
            "max_train_minutes": args.max_train_minutes, "finetune_iter": args.finetune_iter,
            "base_lr": args.base_lr, "datasets": datasets, "calibration_images": args.calibration_images,
            "flops_images": args.flops_images, "taus": sorted(args.taus), "smoke": args.smoke, "seed": args.seed,
            "inference": "one image per forward (batch 1, so ALGM's batch policies 'min' and 'per_image' coincide)"}


def architecture(args: argparse.Namespace, key: str) -> Dict[str, int]:
    """MODEL.BACKBONE's EMBED_DIM, NUM_HEADS and DEPTH of model ``key`` (``SMOKE_ARCH`` under --smoke)."""
    if args.smoke:
        return dict(SMOKE_ARCH)
    return {"EMBED_DIM": MODELS[key]["EMBED_DIM"], "NUM_HEADS": MODELS[key]["NUM_HEADS"], "DEPTH": DEPTH}


def study_config(args: argparse.Namespace, key: str, datasets: Dict[str, str], output_dir: Path):  # noqa: ANN201
    """The plain model's training config: Base-Demo's solver with the study's architecture, crop and schedule."""
    from algm_d2.config import get_cfg

    arch = architecture(args, key)
    crop = args.crop
    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[1] / "configs/demo/Base-Demo.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", args.device, "MODEL.BACKBONE.IMG_SIZE", crop,
        *[item for name, value in arch.items() for item in (f"MODEL.BACKBONE.{name}", value)],
        # the release's mask transformer: 2 layers at the encoder's width (its heads: dim // 64 = the encoder's)
        "MODEL.SEM_SEG_HEAD.NUM_LAYERS", 2, "MODEL.SEM_SEG_HEAD.NUM_HEADS", arch["NUM_HEADS"],
        "DATASETS.TRAIN", (datasets["train"],), "DATASETS.TEST", (datasets["val"],),
        "INPUT.IMAGE_SCALE", (2 * crop, crop), "INPUT.CROP_SIZE", (crop, crop),
        "INPUT.MIN_SIZE_TEST", crop, "INPUT.MAX_SIZE_TEST", 2 * crop,
        "DATALOADER.NUM_WORKERS", args.num_workers,
        "SOLVER.IMS_PER_BATCH", args.batch_size, "SOLVER.BASE_LR", args.base_lr,
        "SOLVER.MAX_ITER", args.max_iter, "SOLVER.WARMUP_ITERS", min(100, args.max_iter // 10),
        "SOLVER.CHECKPOINT_PERIOD", args.max_iter, "SOLVER.LOG_PERIOD", args.eval_period,
        # from scratch, 12 blocks: a guard against loss spikes of the early AdamW steps
        "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0,
        "DEEPSPEED.PRECISION", args.precision, "TEST.PRECISION", args.precision,
        "TEST.EVAL_PERIOD", args.eval_period, "TEST.COMPUTE_FLOPS", False, "TEST.TENSORBOARD_IMAGES", 0,
        "TEST.TIMER_WARMUP_BATCHES", 1 if args.smoke else 10, "SEED", args.seed, "OUTPUT_DIR", str(output_dir),
    ])
    return cfg


class _StopTraining(Exception):
    """Raised from an evaluation to end training early."""


class Plateau:
    """The early-stopping rule: the best evaluation so far, and why to stop (None: go on). Training stops after
    ``patience`` evaluations in a row without a better mIoU, or at the first evaluation after ``deadline``
    (time.monotonic()); never at the last iteration, where training ends anyway."""

    # a plain class: a dataclass needs its module in sys.modules, which a tool loaded from its path is not
    def __init__(self, *, patience: int, deadline: float, max_iter: int) -> None:
        self.patience, self.deadline, self.max_iter = patience, deadline, max_iter
        self.history: List[Dict[str, float]] = []
        self.best: Dict[str, float] = {}

    def update(self, iteration: int, miou: float, now: float) -> Tuple[bool, Optional[str]]:
        """(whether this evaluation is the best so far, the stop reason)."""
        self.history.append({"iteration": iteration, "mIoU": miou})
        improved = not self.best or miou > self.best["mIoU"]
        if improved:
            self.best = {"iteration": iteration, "mIoU": miou}
        if iteration >= self.max_iter:
            return improved, None
        since_best = sum(1 for entry in self.history if entry["iteration"] > self.best["iteration"])
        if since_best >= self.patience:
            return improved, "patience"
        return improved, "time" if now > self.deadline else None


def early_stopping_trainer_class():  # noqa: ANN201 - the class, built after torch is imported
    from algm_d2.engine import Trainer
    from algm_d2.engine.training_checkpoints import save_model_weights

    class EarlyStoppingTrainer(Trainer):
        """Trainer whose periodic evaluations keep the best weights (OUTPUT_DIR/model_best.pth) and end training
        when ``plateau`` says so."""

        def __init__(self, cfg, *, plateau: Plateau) -> None:  # noqa: ANN001 - a CfgNode
            super().__init__(cfg)
            self.plateau = plateau
            self.dataset = cfg.DATASETS.TEST[0]
            self.best_path = self.output_dir / "model_best.pth"
            self.stop_reason = "max_iter"

        def test(self, step: int) -> Dict[str, Any]:
            results = super().test(step)
            improved, stop = self.plateau.update(step, results[self.dataset]["sem_seg"]["mIoU"], time.monotonic())
            if improved:
                save_model_weights(self.engine, self.best_path)
            if stop is not None:
                self.stop_reason = stop
                raise _StopTraining
            return results

        def fit(self) -> Dict[str, Any]:
            """Train until a stop; returns {"best", "history", "stop_reason", "weights"}."""
            try:
                self.train()
            except _StopTraining:
                pass  # train() closed the event writers on its way out
            best = self.plateau.best
            logger.info("%s: stopped (%s) after %d evaluations; best mIoU %.2f at iteration %d", self.output_dir,
                        self.stop_reason, len(self.plateau.history), best["mIoU"], best["iteration"])
            return {"best": best, "history": self.plateau.history, "stop_reason": self.stop_reason,
                    "weights": str(self.best_path)}

    return EarlyStoppingTrainer


def train_until_plateau(cfg, *, patience: int, minutes: float) -> Dict[str, Any]:  # noqa: ANN001 - a CfgNode
    from algm_d2.engine.defaults import seed_everything

    cfg.freeze()
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    (Path(cfg.OUTPUT_DIR) / "config.yaml").write_text(cfg.dump())
    seed_everything(cfg.SEED)
    plateau = Plateau(patience=patience, deadline=time.monotonic() + 60.0 * minutes, max_iter=cfg.SOLVER.MAX_ITER)
    trainer = early_stopping_trainer_class()(cfg, plateau=plateau)
    run = trainer.fit()
    del trainer
    return run


def study_model(args: argparse.Namespace, key: str, datasets: Dict[str, str], output_dir: Path) -> Dict[str, Any]:
    """Train the plain model, fine-tune it with ALGM, and evaluate every setting of the study."""
    from algm_d2.analysis import sweep_thresholds
    from algm_d2.analysis.sweep import evaluate_setting
    from algm_d2.checkpoint import load_model_weights
    from algm_d2.modeling import algm_config_from_cfg, build_model

    start = time.monotonic()
    cfg = study_config(args, key, datasets, output_dir / "plain")
    plain_run = train_until_plateau(cfg, patience=args.patience, minutes=args.max_train_minutes)
    release_cfg = cfg.clone()
    release_cfg.defrost()
    release_cfg.MODEL.ALGM.ENABLED = True
    release_cfg.freeze()
    release = algm_config_from_cfg(release_cfg)  # the defaults are the release's: CLAP τ 0.88 @1, GBM batch_stats @5

    model = build_model(release_cfg).eval()
    load_model_weights(model, plain_run["weights"])
    sweep = sweep_thresholds(release_cfg, model, args.taus, flops_images=args.flops_images)
    calibration = calibrate(args, release_cfg, model, output_dir)
    calibrated = dataclasses.replace(release, local_threshold=calibration["thresholds"]["LOCAL_THRESHOLD"],
                                     global_threshold=calibration["thresholds"]["GLOBAL_THRESHOLD"])
    calibrated_row = evaluate_setting(release_cfg, model, calibrated, datasets["val"], flops_images=args.flops_images)
    del model

    finetune_cfg = study_config(args, key, datasets, output_dir / "algm_finetuned")
    finetune_cfg.merge_from_list([
        "MODEL.ALGM.ENABLED", True, "MODEL.WEIGHTS", plain_run["weights"], "SOLVER.MAX_ITER", args.finetune_iter,
        "SOLVER.CHECKPOINT_PERIOD", args.finetune_iter, "SOLVER.WARMUP_ITERS", min(20, args.finetune_iter // 10),
        "SOLVER.BASE_LR", args.base_lr / 5, "TEST.EVAL_PERIOD", min(args.eval_period, args.finetune_iter)])
    finetune_run = train_until_plateau(finetune_cfg, patience=args.patience, minutes=args.max_train_minutes)
    finetuned = build_model(release_cfg).eval()
    load_model_weights(finetuned, finetune_run["weights"])
    finetuned_row = evaluate_setting(release_cfg, finetuned, release, datasets["val"], flops_images=args.flops_images)
    del finetuned

    baseline = sweep["baseline"]["mIoU"]
    rows = [study_row("plain", None, sweep["baseline"], baseline),
            study_row("ALGM training-free (release rules)", release, sweep["configured"], baseline),
            study_row("ALGM calibrated τ = μ + σ", calibrated, calibrated_row, baseline),
            study_row("ALGM fine-tuned (release rules)", release, finetuned_row, baseline)]
    star = sweep["algm_star"]
    if star is not None:
        rows.append(study_row(f"ALGM* (τ = {star['tau']:g})",
                              dataclasses.replace(release, local_threshold=star["tau"], global_threshold=star["tau"]),
                              star, baseline))
    return {"name": MODELS[key]["name"], "architecture": architecture(args, key), "plain_training": plain_run,
            "algm_finetuning": finetune_run, "calibration": calibration, "sweep": sweep["sweep"],
            "algm_star_tau": star["tau"] if star else None, "rows": rows, "seconds": time.monotonic() - start}


def calibrate(args: argparse.Namespace, cfg, model, output_dir: Path) -> Dict[str, Any]:  # noqa: ANN001
    """τ = μ + σ after ALGM's layers on training crops of the plain model; writes calibrated.yaml beside the plain
    run's config.yaml."""
    import torch

    from algm_d2.analysis.calibration import calibrate_thresholds, write_calibrated_config
    from algm_d2.data import build_train_loader

    loader = build_train_loader(cfg, total_batch_size=min(32, args.batch_size), rank=0, world_size=1)
    batches = (torch.stack([model._normalize(item["image"]) for item in batch])  # noqa: SLF001 - its normalization
               for batch in loader)
    node = cfg.MODEL.ALGM
    with torch.no_grad():
        result = calibrate_thresholds(model.net.backbone, batches, [node.LOCAL_LAYER, node.GLOBAL_LAYER],
                                      max_images=args.calibration_images)
    thresholds = write_calibrated_config(str(output_dir / "calibrated.yaml"), str(output_dir / "plain/config.yaml"),
                                         result, node.LOCAL_LAYER, node.GLOBAL_LAYER)
    return {**result, "thresholds": thresholds, "config": str(output_dir / "calibrated.yaml")}


def study_row(setting: str, algm, result: Dict[str, Any], baseline: float) -> Dict[str, Any]:  # noqa: ANN001
    """One table row from an evaluation (:func:`algm_d2.analysis.sweep.evaluate_setting`'s result)."""
    kept = (result.get("tokens") or {}).get("kept_ratio_per_layer") or []
    rules = {stage: None if algm is None else f"{_rule(getattr(algm, stage + '_threshold'))} after layer "
             f"{getattr(algm, stage + '_layer')}" for stage in ("local", "global")}
    return {"setting": setting, "local_rule": rules["local"], "global_rule": rules["global"],
            "mIoU": result["mIoU"], "delta_mIoU": result["mIoU"] - baseline,
            "images_per_second": result["images_per_second"], "gflops": result.get("gflops"),
            "kept_tokens_mean": sum(kept) / len(kept) if kept else None,
            "kept_tokens_final": kept[-1] if kept else None}


def markdown_tables(study: Dict[str, Any]) -> str:
    settings = study["settings"]
    lines = [f"Demo shapes (procedural, not ADE20K), {settings['crop']}² crops ({settings['grid'][0]}×"
             f"{settings['grid'][1]} patches), {settings['device']} {settings['precision']}; "
             f"inference {settings['inference']}; whole study {study['wall_seconds']:.0f} s.", ""]
    header = ["setting", "CLAP rule", "GBM rule", "mIoU", "Δ mIoU", "images/s", "GFLOPs/image",
              "tokens kept (mean over blocks)", "tokens kept (last block)"]
    for model in study["models"].values():
        plain, arch = model["plain_training"], model["architecture"]
        lines += [f"### {model['name']} ({arch['EMBED_DIM']} dim, {arch['DEPTH']} blocks, {arch['NUM_HEADS']} heads)",
                  "", f"Plain training: best validation mIoU {plain['best']['mIoU']:.2f} at iteration "
                  f"{plain['best']['iteration']} (stopped: {plain['stop_reason']}); ALGM fine-tuning: best at "
                  f"iteration {model['algm_finetuning']['best']['iteration']}. Calibrated τ: "
                  + ", ".join(f"{name} {value:.4f}" for name, value in model["calibration"]["thresholds"].items())
                  + ("" if model["algm_star_tau"] is not None else "; no swept τ reached the plain mIoU (no ALGM*)")
                  + f". Study of this model: {model['seconds']:.0f} s.",
                  "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in model["rows"]:
            flag = " (!)" if row["delta_mIoU"] < -FLAG_MIOU_LOSS else ""
            lines.append("| " + " | ".join([
                row["setting"], row["local_rule"] or "-", row["global_rule"] or "-", f"{row['mIoU']:.2f}",
                f"{row['delta_mIoU']:+.2f}{flag}", _fmt(row["images_per_second"], "{:.1f}"),
                _fmt(row["gflops"], "{:.3f}"), _fmt(row["kept_tokens_mean"], "{:.1%}"),
                _fmt(row["kept_tokens_final"], "{:.1%}")]) + " |")
        lines.append("")
    if any(row["delta_mIoU"] < -FLAG_MIOU_LOSS for model in study["models"].values() for row in model["rows"]):
        lines.append(f"(!): more than {FLAG_MIOU_LOSS:g} mIoU below the plain model.")
    return "\n".join(lines) + "\n"


def _rule(rule) -> str:  # noqa: ANN001 - a float τ or a rule string
    return f"τ {rule:.3f}" if isinstance(rule, float) else str(rule)


def _fmt(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def write_study(study: Dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_study.json").write_text(json.dumps(study, indent=1))
    table = markdown_tables(study)
    (out / "quality_study.md").write_text(table)
    print(table)  # the CLI's result


if __name__ == "__main__":
    main()
