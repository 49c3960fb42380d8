#!/usr/bin/env python
"""Figure 2 of the paper: mean cosine similarity of intra-class vs inter-class token pairs, (a) inside k×k windows
after the attention of layer 1 (MODEL.ALGM.LOCAL_LAYER), (b) over the whole image after every layer, measured on
the base model (merging off). Writes similarity.png and similarity.json to --output-dir.

  python tools/analyze_similarity.py --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k.yaml \
      --dataset ade20k_sem_seg_train --num-images 500 --output-dir out/similarity MODEL.WEIGHTS seg_small_mask/checkpoint.pth
  python tools/analyze_similarity.py --config-file configs/demo/segmenter_tiny.yaml --num-images 16 --output-dir out/sim
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algm_d2.analysis import analyze_similarity, labelled_batches, setup_model  # noqa: E402
from algm_d2.analysis.plots import plot_similarity  # noqa: E402
from algm_d2.data import get_metadata  # noqa: E402
from algm_d2.evaluation import save_json  # noqa: E402


def main(argv=None) -> None:  # noqa: ANN001
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dataset", default="", help="registered dataset (default: the first of DATASETS.TRAIN)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, model = setup_model(args.config_file, args.opts)
    dataset = args.dataset or cfg.DATASETS.TRAIN[0]
    batches = labelled_batches(cfg, model, dataset, size=tuple(cfg.INPUT.CROP_SIZE), batch_size=args.batch_size,
                               max_images=args.num_images)
    local_layer = cfg.MODEL.ALGM.LOCAL_LAYER or 1
    result = analyze_similarity(model.net.backbone, batches, window_sizes=args.window_sizes, window_layer=local_layer,
                                ignore_label=get_metadata(dataset).ignore_label)
    result.update(config_file=args.config_file, dataset=dataset, weights=cfg.MODEL.WEIGHTS)
    out = Path(args.output_dir)
    save_json(str(out / "similarity.json"), result)
    plot_similarity(result, str(out / "similarity.png"))
    logging.getLogger("analyze_similarity").info("wrote %s and %s", out / "similarity.png", out / "similarity.json")


if __name__ == "__main__":
    main()
