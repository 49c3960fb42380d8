"""What ``datasets/prepare_*.py`` run: label remaps of the official releases and a file-conversion loop.

Every remap checks its input: a value the release never writes raises ValueError naming the file and the values
(a wrong input folder is caught on its first file instead of producing silently wrong labels).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Callable, Iterable, List, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from .builtin_meta import (ADE20K_150_CLASSES, CITYSCAPES_LABEL_IDS, COCO_STUFF_IDS, IGNORE_LABEL,
                           PASCAL_CONTEXT_59_FULL_IDS, PASCAL_CONTEXT_NUM_FULL_CLASSES)


@dataclass(frozen=True, eq=False)
class LabelRemap:
    """Maps raw label values through ``table`` (value -> train id); values where ``valid`` is False are errors."""

    name: str
    table: np.ndarray
    valid: np.ndarray

    def __call__(self, label: np.ndarray, file_name: str) -> np.ndarray:
        values = np.unique(label)
        bad = values[(values >= self.table.size) | ~self.valid[np.minimum(values, self.table.size - 1)]]
        if bad.size:
            raise ValueError(f"{file_name}: values {', '.join(str(v) for v in bad[:20])} do not occur in "
                             f"{self.name} label maps; is this the right input folder?")
        return self.table[label]


def _remap(name: str, source_values: Sequence[int], size: int, extra_valid: Iterable[int] = ()) -> LabelRemap:
    """``source_values[k] -> k``; ``extra_valid`` values (and nothing else) map to the ignore label."""
    table = np.full(size, IGNORE_LABEL, dtype=np.uint8)
    table[np.asarray(source_values)] = np.arange(len(source_values), dtype=np.uint8)
    valid = np.zeros(size, dtype=bool)
    valid[np.asarray(list(source_values) + list(extra_valid), dtype=np.int64)] = True
    return LabelRemap(name=name, table=table, valid=valid)


def ade20k_remap() -> LabelRemap:
    """ADEChallengeData2016 annotations: 0 ("other") -> 255, v in 1..150 -> v - 1 (detectron2's convention)."""
    return _remap("ADE20K", range(1, len(ADE20K_150_CLASSES) + 1), len(ADE20K_150_CLASSES) + 1, extra_valid=[0])


def coco_stuff_remap() -> LabelRemap:
    """stuffthingmaps (COCO id - 1; 255 unlabeled) -> contiguous train ids 0..170, 255 unlabeled."""
    return _remap("COCO-Stuff stuffthingmaps", [i - 1 for i in COCO_STUFF_IDS], 256, extra_valid=[IGNORE_LABEL])


def cityscapes_remap() -> LabelRemap:
    """Cityscapes ``*_gtFine_labelIds.png`` (ids 0..33) -> the 19 train ids, other ids -> 255 (the same as
    cityscapesscripts' trainIds rendering of the polygons, which draws the same shapes in the same order)."""
    return _remap("Cityscapes labelIds", CITYSCAPES_LABEL_IDS, 256, extra_valid=range(34))


def pascal_context_59_remap() -> LabelRemap:
    """Full PASCAL-Context labels (1..459; 0 unlabeled) -> the 59 classes 0..58, everything else -> 255."""
    return _remap("PASCAL-Context (459 classes)", PASCAL_CONTEXT_59_FULL_IDS, PASCAL_CONTEXT_NUM_FULL_CLASSES + 1,
                  extra_valid=range(PASCAL_CONTEXT_NUM_FULL_CLASSES + 1))


def read_pascal_context_mat(path: str) -> np.ndarray:
    """The ``LabelMap`` of one ``trainval/<image id>.mat`` file of the PASCAL-Context release."""
    from scipy.io import loadmat

    if not os.path.isfile(path):
        raise FileNotFoundError(f"PASCAL-Context annotation not found: {path}")
    content = loadmat(path)
    if "LabelMap" not in content:
        raise ValueError(f"{path} has no 'LabelMap' (keys: {sorted(k for k in content if not k.startswith('_'))})")
    return np.asarray(content["LabelMap"])


def write_label_png(path: str, label: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(label.astype(np.uint8))):
        raise OSError(f"could not write {path}")


@dataclass(frozen=True, eq=False)
class ConvertLabel:
    """One conversion job: read ``src`` with ``reader``, remap, write ``dst`` as a grayscale PNG."""

    reader: Callable[[str], np.ndarray]
    remap: LabelRemap

    def __call__(self, job: Tuple[str, str]) -> None:
        src, dst = job
        write_label_png(dst, self.remap(self.reader(src), src))


def run_jobs(function: Callable[[Tuple[str, str]], None], jobs: Sequence[Tuple[str, str]], *, workers: int,
             desc: str) -> int:
    """Run ``function`` on each job with a progress bar, in ``workers`` processes (0: in this one)."""
    if not jobs:
        return 0
    if workers > 0:
        with Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(function, jobs, chunksize=16), total=len(jobs), desc=desc):
                pass
    else:
        for job in tqdm(jobs, desc=desc):
            function(job)
    return len(jobs)


def file_jobs(src_dir: str, dst_dir: str, *, src_suffix: str = ".png", dst_suffix: str = ".png",
                   recursive: bool = False) -> List[Tuple[str, str]]:
    """(source, destination) pairs for the ``*src_suffix`` files of ``src_dir``, mirrored under ``dst_dir``."""
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"input folder not found: {src_dir} (see datasets/README.md)")
    jobs = []
    for parent, dirs, files in os.walk(src_dir):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(src_suffix):
                relative = os.path.relpath(os.path.join(parent, name), src_dir)
                jobs.append((os.path.join(src_dir, relative),
                             os.path.join(dst_dir, relative[: -len(src_suffix)] + dst_suffix)))
        if not recursive:
            break
    if not jobs:
        raise ValueError(f"no '*{src_suffix}' files in {src_dir}")
    return jobs

