"""Datasets stored as an image folder and a label-map folder, paired by relative path and file stem.

Used by the builtin datasets (folders under ``$ALGM_DATASETS``) and by custom datasets (any folders, registered
with :func:`register_custom_sem_seg` or from the DATASETS.CUSTOM config keys).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List

from .catalog import DatasetMetadata, RegisteredDataset, dataset_root, register_dataset

logger = logging.getLogger(__name__)

_SHOWN = 5  # paths quoted in an error message


def _index_files(folder: str, suffix: str) -> Dict[str, str]:
    """``{relative path without suffix: path}`` of the files under ``folder`` whose names end with ``suffix``."""
    found = {}
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.endswith(suffix):
                path = os.path.join(parent, name)
                key = os.path.relpath(path, folder)[: -len(suffix)].replace(os.sep, "/")
                found[key] = path
    return dict(sorted(found.items()))


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path} (see datasets/README.md for the expected layout)")


@dataclass(frozen=True)
class SemSegFolders:
    """A dataset loader: images ``image_dir/**/<key><image_suffix>`` with label maps
    ``mask_dir/**/<key><mask_suffix>`` (same relative path and key).

    ``under_dataset_root``: the folders are relative to ``$ALGM_DATASETS``, resolved when the records are listed.
    ``images_from_masks``: list the label maps and look up their images (the image folder holds more images
    than the split, as VOC2010/JPEGImages does); otherwise every image needs a label map.
    """

    image_dir: str
    mask_dir: str
    image_suffix: str = ".jpg"
    mask_suffix: str = ".png"
    under_dataset_root: bool = False
    images_from_masks: bool = False

    def __call__(self) -> List[Dict[str, Any]]:
        root = dataset_root() if self.under_dataset_root else ""
        image_dir, mask_dir = os.path.join(root, self.image_dir), os.path.join(root, self.mask_dir)
        _check_dir(image_dir, "image")
        _check_dir(mask_dir, "label map")
        masks = _index_files(mask_dir, self.mask_suffix)
        if self.images_from_masks:
            if not masks:
                raise ValueError(f"no '*{self.mask_suffix}' label maps under {mask_dir}")
            images = {key: os.path.join(image_dir, key + self.image_suffix) for key in masks}
            missing = [path for path in images.values() if not os.path.isfile(path)]
            if missing:
                raise FileNotFoundError(f"{len(missing)} label maps under {mask_dir} have no image, e.g. "
                                        f"{', '.join(missing[:_SHOWN])}")
        else:
            images = _index_files(image_dir, self.image_suffix)
            if not images:
                raise ValueError(f"no '*{self.image_suffix}' images under {image_dir}")
            unlabelled = [path for key, path in images.items() if key not in masks]
            if unlabelled:
                raise ValueError(f"{len(unlabelled)} images under {image_dir} have no '*{self.mask_suffix}' label "
                                 f"map under {mask_dir}, e.g. {', '.join(unlabelled[:_SHOWN])}")
            extra = len(masks) - len(images)
            if extra:
                logger.warning("%d label maps under %s have no image and are not used", extra, mask_dir)
        return [{"file_name": images[key], "sem_seg_file_name": masks[key], "image_id": key} for key in images]


def read_lines(path: str, what: str) -> List[str]:
    """The non-blank lines of a text file, stripped; errors name ``what`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{what} has no entries (no class names, ids, ...): {path}")
    return lines


def read_class_names(classes_file: str) -> List[str]:
    """One class name per line (blank lines and surrounding spaces ignored)."""
    return read_lines(classes_file, "class list file")


def register_custom_sem_seg(name: str, image_dir: str, mask_dir: str, classes_file: str, ignore_label: int = 255,
                            image_ext: str = ".jpg", mask_ext: str = ".png") -> RegisteredDataset:
    """Register a dataset of ``image_dir/<stem><image_ext>`` images with ``mask_dir/<stem><mask_ext>`` label maps
    (subfolders allowed, mirrored in both) and the classes listed in ``classes_file``. Label values must be class
    indices ``0..K-1`` or ``ignore_label``. Registering the same arguments again is a no-op."""
    metadata = DatasetMetadata(stuff_classes=tuple(read_class_names(classes_file)), ignore_label=ignore_label)
    loader = SemSegFolders(image_dir=os.path.abspath(image_dir), mask_dir=os.path.abspath(mask_dir),
                           image_suffix=image_ext, mask_suffix=mask_ext)
    return register_dataset(name, loader, metadata)


def register_datasets_from_config(cfg) -> List[str]:  # noqa: ANN001 - a CfgNode
    """Register the DATASETS.CUSTOM datasets; returns their names. Safe to call more than once."""
    custom = cfg.DATASETS.CUSTOM
    lengths = {"NAMES": len(custom.NAMES), "IMAGE_DIRS": len(custom.IMAGE_DIRS), "MASK_DIRS": len(custom.MASK_DIRS)}
    if len(set(lengths.values())) != 1:
        raise ValueError("DATASETS.CUSTOM.NAMES, IMAGE_DIRS and MASK_DIRS must have the same length, got "
                         + ", ".join(f"{key}={n}" for key, n in lengths.items()))
    if custom.NAMES and not custom.CLASSES_FILE:
        raise ValueError("DATASETS.CUSTOM.CLASSES_FILE must be set when DATASETS.CUSTOM.NAMES is")
    for name, image_dir, mask_dir in zip(custom.NAMES, custom.IMAGE_DIRS, custom.MASK_DIRS):
        register_custom_sem_seg(name, image_dir, mask_dir, custom.CLASSES_FILE, ignore_label=custom.IGNORE_LABEL,
                                image_ext=custom.IMAGE_EXT, mask_ext=custom.MASK_EXT)
    return list(custom.NAMES)
