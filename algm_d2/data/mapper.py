"""The dataset mapper: a record -> the dict the model and the evaluator take (detectron2's DatasetMapper role).

Mappers are called as ``mapper(record, rng)`` by the loaders, which pass a ``np.random.Generator`` seeded from
``(SEED, position in the data stream)`` so that augmentations do not depend on worker count or resumption.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .catalog import DatasetMetadata, get_metadata
from .readers import BadSampleError, read_image, read_sem_seg
from .transforms import augment_train, resize_test


def check_image_and_label(image: np.ndarray, label: Optional[np.ndarray], record: Dict[str, Any]) -> None:
    """BadSampleError naming the files when the label map or the record's height/width disagree with the image."""
    height, width = image.shape[:2]
    if label is not None and label.shape[:2] != (height, width):
        raise BadSampleError(f"image {record['file_name']} is {height}x{width} but its label map "
                             f"{record['sem_seg_file_name']} is {label.shape[0]}x{label.shape[1]}")
    expected = (record.get("height", height), record.get("width", width))
    if expected != (height, width):
        raise BadSampleError(f"image {record['file_name']} is {height}x{width} but its record says "
                             f"{expected[0]}x{expected[1]}")


def common_metadata(dataset_names: Sequence[str]) -> DatasetMetadata:
    """The metadata shared by ``dataset_names``; ValueError naming them when their classes or ignore labels differ."""
    if not dataset_names:
        raise ValueError("no dataset names given")
    first = get_metadata(dataset_names[0])
    for name in dataset_names[1:]:
        other = get_metadata(name)
        if (other.stuff_classes, other.ignore_label) != (first.stuff_classes, first.ignore_label):
            raise ValueError(f"datasets {dataset_names[0]!r} and {name!r} have different classes or ignore labels "
                             "and cannot be used together")
    return first


class SemSegDatasetMapper:
    """Reads a record's image and label map, checks them, augments (training) or resizes (test).

    Output: ``{"image": uint8 [3, H, W] RGB, "sem_seg": int64 [H, W], "height", "width" (original size),
    "file_name", "image_id"}``. Training crops/pads to ``crop_size`` (pad: image 0, label ``ignore_label``). Test
    resizes the image only; ``"sem_seg"`` stays at the original resolution for the evaluator and is absent when the
    record has no ``"sem_seg_file_name"``.

    Args:
        is_train: training augmentation (True) or test resize (False).
        num_classes, ignore_label: label values outside ``[0, num_classes)`` other than ``ignore_label`` are errors.
        image_scale: base (long, short) scale of the random resize; ``ratio_range`` scales it.
        crop_size: (height, width) of the training crop.
        cat_max_ratio: redraw crops dominated by one class (1.0 = off).
        flip_prob: probability of a horizontal flip.
        photometric_distortion: mmseg's brightness/contrast/saturation/hue jitter.
        min_size_test, max_size_test: test resize (short side, long side limit; 0 = no resize / no limit).
        size_divisibility_test: then resize each side up to a multiple of this (0 = off; EVA's ADE20K: 32).
    """

    def __init__(self, *, is_train: bool, num_classes: int, ignore_label: int = 255,
                 image_scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0),
                 crop_size: Tuple[int, int] = (512, 512), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric_distortion: bool = True, min_size_test: int = 512, max_size_test: int = 2048,
                 size_divisibility_test: int = 0) -> None:
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"crop_size must be (height, width) > 0, got {crop_size}")
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.is_train = is_train
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.image_scale = tuple(image_scale)
        self.ratio_range = tuple(ratio_range)
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric_distortion = photometric_distortion
        self.min_size_test = min_size_test
        self.max_size_test = max_size_test
        self.size_divisibility_test = size_divisibility_test

    @classmethod
    def from_config(cls, cfg, is_train: bool = True,  # noqa: ANN001 - a CfgNode
                    dataset_names: Optional[Sequence[str]] = None) -> "SemSegDatasetMapper":
        """Classes and ignore label from the datasets' metadata (default: DATASETS.TRAIN or DATASETS.TEST)."""
        if dataset_names is None:
            dataset_names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        metadata = common_metadata(dataset_names)
        return cls(is_train=is_train, num_classes=metadata.num_classes, ignore_label=metadata.ignore_label,
                   image_scale=cfg.INPUT.IMAGE_SCALE, ratio_range=cfg.INPUT.RATIO_RANGE,
                   crop_size=cfg.INPUT.CROP_SIZE, cat_max_ratio=cfg.INPUT.CAT_MAX_RATIO,
                   flip_prob=cfg.INPUT.FLIP_PROB, photometric_distortion=cfg.INPUT.PHOTOMETRIC_DISTORTION,
                   min_size_test=cfg.INPUT.MIN_SIZE_TEST, max_size_test=cfg.INPUT.MAX_SIZE_TEST,
                   size_divisibility_test=cfg.INPUT.SIZE_DIVISIBILITY_TEST)

    def __call__(self, record: Dict[str, Any], rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
        """Map one record; ``rng`` drives the training augmentation (None: a freshly seeded generator)."""
        image = read_image(record["file_name"])
        label = None
        if "sem_seg_file_name" in record:
            label = read_sem_seg(record["sem_seg_file_name"], num_classes=self.num_classes,
                                 ignore_label=self.ignore_label)
        elif self.is_train:
            raise ValueError(f"training record of {record['file_name']} has no 'sem_seg_file_name'")
        check_image_and_label(image, label, record)
        output = {"file_name": record["file_name"], "height": image.shape[0], "width": image.shape[1]}
        if "image_id" in record:
            output["image_id"] = record["image_id"]
        if self.is_train:
            image, label = augment_train(
                image, label, rng if rng is not None else np.random.default_rng(), image_scale=self.image_scale,
                ratio_range=self.ratio_range, crop_size=self.crop_size, cat_max_ratio=self.cat_max_ratio,
                flip_prob=self.flip_prob, photometric=self.photometric_distortion, ignore_label=self.ignore_label)
        else:
            image = resize_test(image, min_size=self.min_size_test, max_size=self.max_size_test,
                                size_divisibility=self.size_divisibility_test)
        output["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            output["sem_seg"] = torch.from_numpy(label.astype(np.int64))
        return output
