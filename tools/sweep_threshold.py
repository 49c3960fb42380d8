#!/usr/bin/env python
"""Figure 4 of the paper: mIoU, images/s and GFLOPs of one model over a range of ALGM thresholds τ at inference,
next to the model without merging and with its configured rules, and ALGM*: the smallest τ whose mIoU is not below
the model without merging. Writes sweep.png and sweep.json to --output-dir.

  python tools/sweep_threshold.py --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml \
      --taus 0.70 0.75 0.80 0.85 0.88 0.90 0.95 --flops-images 20 --output-dir out/sweep MODEL.WEIGHTS model_final.pth
  # --stage local|global sweeps one stage's τ and keeps the other's configured rule (default: both)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algm_d2.analysis import setup_model, sweep_thresholds  # noqa: E402
from algm_d2.analysis.plots import plot_sweep  # noqa: E402
from algm_d2.analysis.sweep import STAGES  # noqa: E402
from algm_d2.evaluation import save_json  # noqa: E402


def main(argv=None) -> None:  # noqa: ANN001
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--taus", type=float, nargs="+", required=True, help="thresholds τ to evaluate")
    parser.add_argument("--stage", choices=STAGES, default="both", help="which stage's rule τ replaces")
    parser.add_argument("--dataset", default="", help="registered dataset (default: the first of DATASETS.TEST)")
    parser.add_argument("--flops-images", type=int, default=0, help="count GFLOPs on this many images (0: skip)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, model = setup_model(args.config_file, args.opts)
    result = sweep_thresholds(cfg, model, args.taus, stage=args.stage, dataset=args.dataset or None,
                              flops_images=args.flops_images)
    result.update(config_file=args.config_file, weights=cfg.MODEL.WEIGHTS)
    out = Path(args.output_dir)
    save_json(str(out / "sweep.json"), result)
    plot_sweep(result, str(out / "sweep.png"))
    star = result["algm_star"]
    print(json.dumps({"baseline_mIoU": result["baseline"]["mIoU"],
                      "algm_star_tau": star["tau"] if star else None}))  # the CLI's result


if __name__ == "__main__":
    main()
