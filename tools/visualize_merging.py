#!/usr/bin/env python
"""Figure 5 of the paper: an image with the groups each ALGM stage merged drawn over it (one panel per merging
layer: CLAP's windows, GBM's groups). Writes <name>_merging.png and <name>_merging.json per image to --output-dir.

  python tools/visualize_merging.py --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml \
      --input a.jpg photos/ --output-dir out/merging MODEL.WEIGHTS model_final.pth
  python tools/visualize_merging.py --config-file configs/demo/segmenter_tiny_algm.yaml --num-images 4 --output-dir out/m
  # without --input: the first --num-images images of --dataset (default: the first of DATASETS.TEST)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algm_d2.analysis import setup_model  # noqa: E402
from algm_d2.analysis.demo import input_images, merge_panels  # noqa: E402
from algm_d2.analysis.plots import plot_merging  # noqa: E402
from algm_d2.evaluation import save_json  # noqa: E402


def main(argv=None) -> None:  # noqa: ANN001
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="*", default=[], help="image files or folders")
    parser.add_argument("--dataset", default="", help="without --input: a registered dataset")
    parser.add_argument("--num-images", type=int, default=4, help="without --input: how many dataset images")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, model = setup_model(args.config_file, args.opts)
    out = Path(args.output_dir)
    for name, image in input_images(cfg, args.input, dataset=args.dataset, num_images=args.num_images):
        picture, grid, panels = merge_panels(model, image)
        plot_merging(picture, grid, panels, str(out / f"{name}_merging.png"))
        save_json(str(out / f"{name}_merging.json"), {"grid": list(grid), "panels": panels})


if __name__ == "__main__":
    main()
