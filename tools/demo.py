#!/usr/bin/env python
"""Segment your own images, as detectron2's demo/demo.py: for each input writes <name>_seg.png (the prediction in
the dataset's palette over the image, with a legend of the classes present) and <name>_merging.png (the groups
ALGM merged, tools/visualize_merging.py's figure) to --output, plus demo.json; prints images/s and kept tokens.

  python tools/demo.py --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml \
      --input photo.jpg photos/ --output out/demo MODEL.WEIGHTS model_final.pth
  # CPU: add MODEL.DEVICE cpu (a CUDA config falls back to the CPU by itself when there is no GPU)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algm_d2.analysis import setup_model  # noqa: E402
from algm_d2.analysis.demo import input_images, kept_tokens, merge_panels, original_image, segment  # noqa: E402
from algm_d2.analysis.plots import plot_merging, plot_segmentation  # noqa: E402
from algm_d2.data import get_metadata  # noqa: E402
from algm_d2.evaluation import save_json  # noqa: E402


def main(argv=None) -> None:  # noqa: ANN001
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders of images")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--no-merging", action="store_true", help="skip the merge figure")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg, model = setup_model(args.config_file, args.opts)
    metadata = get_metadata(cfg.DATASETS.TEST[0])
    out = Path(args.output)
    records, seconds = [], []
    for name, item in input_images(cfg, args.input):
        labels, elapsed, stats = segment(model, item)
        kept, total = kept_tokens(stats)
        present = plot_segmentation(original_image(item), labels, metadata.stuff_classes, metadata.stuff_colors,
                                    str(out / f"{name}_seg.png"))
        if not args.no_merging:
            picture, grid, panels = merge_panels(model, item)
            plot_merging(picture, grid, panels, str(out / f"{name}_merging.png"))
        seconds.append(elapsed)
        records.append({"name": name, "file_name": str(item["file_name"]), "seconds": elapsed,
                        "kept_patch_tokens": kept, "patch_tokens": total,
                        "classes": [metadata.stuff_classes[i] for i in present]})
        print(f"{item['file_name']}: {elapsed * 1000:.1f} ms, {kept:.0f} of {total} patch tokens kept, "
              f"classes: {', '.join(records[-1]['classes'])}")
    timed = seconds[1:] or seconds  # the first forward warms up (allocations, kernels)
    summary = {"images": len(records), "images_per_second": len(timed) / sum(timed), "device": str(model.device),
               "mean_kept_patch_tokens": sum(r["kept_patch_tokens"] for r in records) / len(records),
               "patch_tokens": records[0]["patch_tokens"]}
    save_json(str(out / "demo.json"), {"summary": summary, "images": records, "config_file": args.config_file})
    print(f"{summary['images']} images on {summary['device']}: {summary['images_per_second']:.2f} images/s "
          f"(one at a time{', first left out as warm-up' if len(seconds) > 1 else ''}), "
          f"{summary['mean_kept_patch_tokens']:.1f} of {summary['patch_tokens']} patch tokens kept on average")


if __name__ == "__main__":
    main()
