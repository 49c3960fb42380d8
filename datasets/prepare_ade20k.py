#!/usr/bin/env python
"""ADE20K (SceneParsing, ADEChallengeData2016): write the label maps the builtin ade20k_sem_seg_* datasets read.

Input  (the official ADEChallengeData2016.zip, unzipped under the dataset root):
    ADEChallengeData2016/images/{training,validation}/*.jpg
    ADEChallengeData2016/annotations/{training,validation}/*.png     (0 = other, 1..150 = classes)
Output:
    ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png   (label - 1, 0 -> 255)

    python datasets/prepare_ade20k.py [--root $ALGM_DATASETS] [--workers 8]
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import List, Optional


logger = logging.getLogger("prepare_ade20k")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="dataset root holding ADEChallengeData2016/ "
                        "(default: $ALGM_DATASETS or ./datasets)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: convert in this process)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # imported after parsing, so that --help answers without loading torch
    from algm_d2.data.catalog import dataset_root
    from algm_d2.data.prepare import ConvertLabel, ade20k_remap, file_jobs, run_jobs
    from algm_d2.data.readers import read_sem_seg

    args.root = args.root or dataset_root()
    base = os.path.join(args.root, "ADEChallengeData2016")
    convert = ConvertLabel(reader=read_sem_seg, remap=ade20k_remap())
    for split in ("training", "validation"):
        jobs = file_jobs(os.path.join(base, "annotations", split),
                              os.path.join(base, "annotations_detectron2", split))
        count = run_jobs(convert, jobs, workers=args.workers, desc=f"ADE20K {split}")
        logger.info("wrote %d label maps to %s", count, os.path.join(base, "annotations_detectron2", split))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
