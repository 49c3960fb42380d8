#!/usr/bin/env python
"""Calibrate ALGM's thresholds on training crops (paper Sec. 3.3): τ = μ + σ of all-pair token cosine similarities
after the attention of each ALGM layer, measured on the base model (merging off).

  python tools/calibrate_thresholds.py --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml \
      --num-images 2000 --output tau.json MODEL.WEIGHTS seg_small_mask/checkpoint.pth
  # then train/evaluate with: MODEL.ALGM.CALIBRATION_FILE tau.json
  # or --write-config seg_s_calibrated.yaml: a config that _BASE_s --config-file with LOCAL/GLOBAL_THRESHOLD set
  # --all-layers: statistics after every block (the paper's Fig. 2b analysis, to choose LOCAL/GLOBAL_LAYER)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("calibrate_thresholds")
# which similarities τ = μ + σ summarises (paper Sec. 3.3: "the cosine similarities between all token pairs")
PAIRS = ("cosine similarity of every ordered pair (i, j), i != j, of one image's patch tokens (class/prefix tokens "
         "excluded) right after the layer's attention residual, pooled over all images; the base model, merging off")


def main(argv=None) -> None:  # noqa: ANN001
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num-images", type=int, default=1000, help="training crops to measure")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default="calibration.json")
    parser.add_argument("--all-layers", action="store_true",
                        help="measure after every block, not only MODEL.ALGM.LOCAL_LAYER / GLOBAL_LAYER")
    parser.add_argument("--write-config", default="",
                        help="also write a YAML config that _BASE_s --config-file with the calibrated thresholds")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import torch

    from algm_d2.analysis.calibration import calibrate_thresholds, write_calibrated_config
    from algm_d2.checkpoint import load_model_weights
    from algm_d2.config import get_cfg
    from algm_d2.data import build_train_loader
    from algm_d2.evaluation import save_json
    from algm_d2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_model_weights(model, cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: calibrating randomly initialised weights, whose tokens are nearly "
                       "alike; the paper calibrates the trained base model")
    backbone = model.net.backbone
    layers = [layer for layer in (cfg.MODEL.ALGM.LOCAL_LAYER, cfg.MODEL.ALGM.GLOBAL_LAYER) if layer is not None]
    if args.all_layers:
        layers = list(range(1, backbone.depth + 1))
    loader = build_train_loader(cfg, total_batch_size=args.batch_size, rank=0, world_size=1)
    normalize = model._normalize  # noqa: SLF001 - the model's own pixel normalization

    def batches():
        for batch in loader:
            yield torch.stack([normalize(item["image"]) for item in batch])

    result = calibrate_thresholds(backbone, batches(), layers, max_images=args.num_images)
    result["config_file"] = args.config_file
    result["pairs"] = PAIRS
    for layer, stats in result["layers"].items():
        if stats["threshold"] >= 1.0:
            logger.warning("layer %s: τ = μ + σ = %.4f + %.4f = %.4f >= 1 is above every cosine similarity; with "
                           "MODEL.ALGM.CALIBRATION_FILE a stage at this layer would merge nothing, so that file is "
                           "refused for it", layer, stats["mean"], stats["std"], stats["threshold"])
    save_json(args.output, result)
    if args.write_config:
        write_calibrated_config(args.write_config, args.config_file, result, cfg.MODEL.ALGM.LOCAL_LAYER,
                                cfg.MODEL.ALGM.GLOBAL_LAYER)
    print(json.dumps(result, indent=1))  # the CLI's result


if __name__ == "__main__":
    main()
