#!/usr/bin/env python
"""Mask2Former's train_net with the bridged EVA-01 + ViT-Adapter + ALGM backbone on one CUDA GPU: a few bf16 AMP
training iterations and an evaluation on a synthetic ADE20K-like dataset written to disk, then inference images/s
with ALGM off and on (same weights and images, interleaved rounds, bf16 autocast, a synchronize after every batch).

  python tools/d2_gpu_check.py --output-dir output/d2_gpu_check [--iters 5] [--size 512] [--batch 4] [KEY VALUE ...]
(KEY VALUE: config overrides, e.g. a smaller EVA: MODEL.BACKBONE.EMBED_DIM 1024 MODEL.BACKBONE.DEPTH 24 ...)
Needs detectron2 and Mask2Former (tools/d2_gpu_check.sh installs them from the pinned sources).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from algm_d2.d2.train_net import main, setup
from algm_d2.data.demo import render_demo_shapes
from algm_d2.merge import OFF

CONFIG = Path(__file__).resolve().parents[1] / "configs/detectron2/ade20k/maskformer2_eva01_vit_adapter_896_algm.yaml"
NUM_CLASSES = 6


def register(root: Path, name: str, count: int, size: int) -> None:
    """``count`` procedural images + labels (6 classes) on disk, registered for SemSegEvaluator."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        image, label = render_demo_shapes(seed=0, split=name, index=i, size=size)
        image_path, label_path = root / "images" / f"{i:04d}.jpg", root / "labels" / f"{i:04d}.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(label_path), label.astype(np.uint8))
        records.append({"file_name": str(image_path), "sem_seg_file_name": str(label_path), "height": size,
                        "width": size, "image_id": i})
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=[f"class{k}" for k in range(NUM_CLASSES)], ignore_label=255,
                                  evaluator_type="sem_seg")


@torch.no_grad()
def images_per_second(model: torch.nn.Module, batch: torch.Tensor, rounds: int, iters: int) -> Dict[str, float]:
    """Backbone + head forward on the normalized ``batch``, ALGM off and on in interleaved rounds; the median
    images/s of each."""
    backbone = model.backbone
    algm = backbone.algm
    rates: Dict[str, List[float]] = {"plain": [], "algm": []}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(rounds):
            for name, config in (("plain", OFF), ("algm", algm)):
                backbone.algm = config
                model.sem_seg_head(backbone(batch))  # warm-up of this setting
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(iters):
                    model.sem_seg_head(backbone(batch))
                    torch.cuda.synchronize()
                rates[name].append(iters * batch.shape[0] / (time.perf_counter() - start))
    backbone.algm = algm
    return {name: float(np.median(values)) for name, values in rates.items()}


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("output/d2_gpu_check"))
    parser.add_argument("--iters", type=int, default=5, help="training iterations")
    parser.add_argument("--size", type=int, default=512, help="image side (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=4, help="images per training step and per timed forward")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/d2_gpu_check.py needs a CUDA GPU")
    register(options.output_dir / "train", "gpu_check_train", 4 * options.batch, options.size)
    register(options.output_dir / "val", "gpu_check_val", 2 * options.batch, options.size)
    size = options.size
    opts = ["MODEL.DEVICE", "cuda", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_CLASSES,
            "DATASETS.TRAIN", "('gpu_check_train',)", "DATASETS.TEST", "('gpu_check_val',)",
            "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", size, "INPUT.CROP.SIZE", f"({size}, {size})",
            "INPUT.SIZE_DIVISIBILITY", size, "INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size,
            "SOLVER.IMS_PER_BATCH", options.batch, "SOLVER.MAX_ITER", options.iters,
            "SOLVER.CHECKPOINT_PERIOD", 10 ** 6,
            "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "bfloat16", "TEST.EVAL_PERIOD", 0,
            "DATALOADER.NUM_WORKERS", 2, "OUTPUT_DIR", options.output_dir / "train_net", *options.opts]
    args = default_argument_parser().parse_args(["--config-file", str(CONFIG), *map(str, opts)])
    main(args)  # trains options.iters bf16 iterations, saves model_final.pth, evaluates gpu_check_val
    metrics_file = options.output_dir / "train_net" / "metrics.json"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    cfg = setup(args)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(options.output_dir / "train_net" / "model_final.pth"))
    images = [cv2.cvtColor(cv2.imread(r["file_name"]), cv2.COLOR_BGR2RGB)
              for r in DatasetCatalog.get("gpu_check_val")[: options.batch]]
    batch = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).cuda().float()
    batch = (batch - model.pixel_mean) / model.pixel_std  # the val images, normalized as MaskFormer does
    result = {"losses": [m["total_loss"] for m in metrics if "total_loss" in m],
              "mIoU": [m["sem_seg/mIoU"] for m in metrics if "sem_seg/mIoU" in m],
              "images_per_second": images_per_second(model, batch, options.rounds, iters=10),
              "device": torch.cuda.get_device_name(), "size": size, "batch": options.batch}
    result["speedup"] = result["images_per_second"]["algm"] / result["images_per_second"]["plain"]
    (options.output_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run()
