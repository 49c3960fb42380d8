#!/usr/bin/env python
"""Cityscapes: write the ``*_gtFine_labelTrainIds.png`` maps the builtin cityscapes_fine_sem_seg_* datasets read.

Input  (gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip, unzipped under <root>/cityscapes):
    cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png
    cityscapes/gtFine/{train,val}/<city>/*_gtFine_polygons.json   (and *_gtFine_labelIds.png)
Output (next to the inputs; 19 train ids, 255 = ignore):
    cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png

Two equivalent routes:
    --from polygons  (default) cityscapesscripts' renderer, as its createTrainIdLabelImgs does:
                     pip install cityscapesscripts
    --from labelIds  remap the released *_gtFine_labelIds.png (same polygons, same drawing order); no extra package

    python datasets/prepare_cityscapes.py [--root $ALGM_DATASETS] [--from labelIds] [--workers 8]
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, List, Optional, Tuple


logger = logging.getLogger("prepare_cityscapes")

TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
SOURCE_SUFFIX = {"polygons": "_gtFine_polygons.json", "labelIds": "_gtFine_labelIds.png"}


def json2label_img() -> Callable[[str, str, str], None]:
    """cityscapesscripts' polygon renderer, imported on use: it is an optional dependency."""
    try:
        from cityscapesscripts.preparation.json2labelImg import json2labelImg
    except ImportError as error:
        raise ImportError("--from polygons needs cityscapesscripts: pip install cityscapesscripts "
                          "(or use --from labelIds)") from error
    return json2labelImg


def render_train_ids(job: Tuple[str, str]) -> None:
    src, dst = job
    json2label_img()(src, dst, "trainIds")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="dataset root holding cityscapes/ "
                        "(default: $ALGM_DATASETS or ./datasets)")
    parser.add_argument("--from", dest="source", choices=sorted(SOURCE_SUFFIX), default="polygons",
                        help="render the polygons (cityscapesscripts) or remap the labelIds PNGs")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="gtFine splits to convert")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: convert in this process)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # imported after parsing, so that --help answers without loading torch
    from algm_d2.data.catalog import dataset_root
    from algm_d2.data.prepare import ConvertLabel, cityscapes_remap, file_jobs, run_jobs
    from algm_d2.data.readers import read_sem_seg

    args.root = args.root or dataset_root()
    if args.source == "polygons":
        json2label_img()  # fail before listing files when the package is missing
    function = render_train_ids if args.source == "polygons" else ConvertLabel(reader=read_sem_seg,
                                                                               remap=cityscapes_remap())
    for split in args.splits:
        folder = os.path.join(args.root, "cityscapes", "gtFine", split)
        jobs = file_jobs(folder, folder, src_suffix=SOURCE_SUFFIX[args.source], dst_suffix=TRAIN_IDS_SUFFIX,
                         recursive=True)
        count = run_jobs(function, jobs, workers=args.workers, desc=f"Cityscapes {split}")
        logger.info("wrote %d label maps under %s", count, folder)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
