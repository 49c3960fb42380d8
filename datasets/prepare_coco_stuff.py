#!/usr/bin/env python
"""COCO-Stuff 164K: write the label maps the builtin coco_2017_{train,val}_stuff_sem_seg datasets read.

Input  (under the dataset root):
    coco/{train2017,val2017}/*.jpg                       (COCO 2017 images: train2017.zip, val2017.zip)
    coco/stuffthingmaps/{train2017,val2017}/*.png        (stuffthingmaps_trainval2017.zip: unzip -d coco/stuffthingmaps)
                                                         (values: COCO id - 1 for 182 ids, 255 = unlabeled)
Output:
    coco/stuffthingmaps_detectron2/{train2017,val2017}/*.png   (171 contiguous ids 0..170, 255 = unlabeled)

    python datasets/prepare_coco_stuff.py [--root $ALGM_DATASETS] [--workers 8]
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import List, Optional


logger = logging.getLogger("prepare_coco_stuff")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="dataset root holding coco/ "
                        "(default: $ALGM_DATASETS or ./datasets)")
    parser.add_argument("--input-dir", default="coco/stuffthingmaps",
                        help="folder of the official stuffthingmaps, relative to --root")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: convert in this process)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # imported after parsing, so that --help answers without loading torch
    from algm_d2.data.catalog import dataset_root
    from algm_d2.data.prepare import ConvertLabel, coco_stuff_remap, file_jobs, run_jobs
    from algm_d2.data.readers import read_sem_seg

    args.root = args.root or dataset_root()
    convert = ConvertLabel(reader=read_sem_seg, remap=coco_stuff_remap())
    for split in ("train2017", "val2017"):
        output = os.path.join(args.root, "coco", "stuffthingmaps_detectron2", split)
        jobs = file_jobs(os.path.join(args.root, args.input_dir, split), output)
        count = run_jobs(convert, jobs, workers=args.workers, desc=f"COCO-Stuff {split}")
        logger.info("wrote %d label maps to %s", count, output)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
