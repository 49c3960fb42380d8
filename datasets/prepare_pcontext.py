#!/usr/bin/env python
"""PASCAL-Context 59: write the label maps the builtin pascal_context_59_sem_seg_{train,val} datasets read.

Input (under the dataset root):
    VOCdevkit/VOC2010/JPEGImages/*.jpg                   (VOCtrainval_03-May-2010.tar)
    VOCdevkit/VOC2010/ImageSets/Main/{train,val}.txt     (same tar: 4998 train and 5105 val images)
    VOCdevkit/VOC2010/trainval/<image id>.mat            (PASCAL-Context trainval.tar.gz, the full 459-class
                                                          annotation: one 'LabelMap' per image, ids of labels.txt)
Output:
    VOCdevkit/VOC2010/annotations_detectron2/pc59/{train,val}/<image id>.png
    (the 59 most frequent classes as 0..58 in alphabetical order; the other 400 classes and unlabeled -> 255)

This reads the .mat release directly (scipy) instead of the Detail API's trainval_merged.json, which needs a
package that is not on PyPI; both hold the same 459-class labels.

    python datasets/prepare_pcontext.py [--root $ALGM_DATASETS] [--context-dir DIR] [--workers 8]
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import List, Optional, Tuple


logger = logging.getLogger("prepare_pcontext")

VOC2010 = os.path.join("VOCdevkit", "VOC2010")


def split_ids(voc_dir: str, split: str) -> List[str]:
    from algm_d2.data.folders import read_lines

    return read_lines(os.path.join(voc_dir, "ImageSets", "Main", f"{split}.txt"), "VOC2010 split list")


def split_jobs(voc_dir: str, context_dir: str, split: str) -> List[Tuple[str, str]]:
    output = os.path.join(voc_dir, "annotations_detectron2", "pc59", split)
    jobs = [(os.path.join(context_dir, f"{image_id}.mat"), os.path.join(output, f"{image_id}.png"))
            for image_id in split_ids(voc_dir, split)]
    missing = [src for src, _ in jobs if not os.path.isfile(src)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of the {split} split have no PASCAL-Context annotation, "
                                f"e.g. {', '.join(missing[:5])}")
    return jobs


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="dataset root holding VOCdevkit/ "
                        "(default: $ALGM_DATASETS or ./datasets)")
    parser.add_argument("--context-dir", default=None,
                        help="folder of the PASCAL-Context .mat files (default: <root>/VOCdevkit/VOC2010/trainval)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: convert in this process)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    # imported after parsing, so that --help answers without loading torch
    from algm_d2.data.catalog import dataset_root
    from algm_d2.data.prepare import ConvertLabel, pascal_context_59_remap, read_pascal_context_mat, run_jobs

    args.root = args.root or dataset_root()
    voc_dir = os.path.join(args.root, VOC2010)
    context_dir = args.context_dir or os.path.join(voc_dir, "trainval")
    if not os.path.isdir(context_dir):
        raise FileNotFoundError(f"PASCAL-Context annotation folder not found: {context_dir}")
    convert = ConvertLabel(reader=read_pascal_context_mat, remap=pascal_context_59_remap())
    for split in ("train", "val"):
        jobs = split_jobs(voc_dir, context_dir, split)
        count = run_jobs(convert, jobs, workers=args.workers, desc=f"PASCAL-Context {split}")
        logger.info("wrote %d label maps to %s", count, os.path.dirname(jobs[0][1]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
