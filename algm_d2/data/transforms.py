"""The training and test geometry/photometry of mmseg/Segmenter, as functions on numpy arrays.

Images are ``[H, W, 3]`` uint8 RGB, label maps ``[H, W]`` uint8/uint16; all randomness comes from the
``np.random.Generator`` passed in. Sizes are ``(height, width)``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import cv2
import numpy as np

CROP_TRIES = 10  # mmseg's RandomCrop redraws a crop at most this many times for cat_max_ratio


def rescale_size(height: int, width: int, *, long_edge: float, short_edge: float) -> Tuple[int, int]:
    """mmcv's keep-ratio rule: the largest size whose short side is <= ``short_edge`` and long side <=
    ``long_edge`` (0 = no limit on the long side)."""
    if short_edge <= 0:
        raise ValueError(f"short_edge must be > 0, got {short_edge}")
    factor = short_edge / min(height, width)
    if long_edge > 0:
        factor = min(factor, long_edge / max(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    if label.shape[:2] == tuple(size):
        return label
    return cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def random_scale_size(height: int, width: int, *, image_scale: Sequence[int], ratio_range: Sequence[float],
                      rng: np.random.Generator) -> Tuple[int, int]:
    """mmseg's ``Resize(img_scale, ratio_range, keep_ratio=True)``: scale ``image_scale`` by a uniform ratio, then
    fit the image inside it."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    scale = (int(image_scale[0] * ratio), int(image_scale[1] * ratio))
    return rescale_size(height, width, long_edge=max(scale), short_edge=min(scale))


def random_crop_box(label: np.ndarray, crop_size: Sequence[int], *, cat_max_ratio: float, ignore_label: int,
                    rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop (mmseg's RandomCrop): while one class covers
    ``>= cat_max_ratio`` of the crop's labelled pixels (or only one class is there) redraw, at most
    :data:`CROP_TRIES` times, then keep the last draw."""
    height, width = label.shape[:2]
    crop_h, crop_w = min(crop_size[0], height), min(crop_size[1], width)

    def draw() -> Tuple[int, int, int, int]:
        return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1)), crop_h, crop_w

    box = draw()
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(CROP_TRIES):
        top, left, _, _ = box
        counts = np.bincount(label[top:top + crop_h, left:left + crop_w].ravel())
        if ignore_label < counts.size:
            counts[ignore_label] = 0
        counts = counts[counts > 0]
        if counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = draw()
    return box


def crop(array: np.ndarray, box: Tuple[int, int, int, int]) -> np.ndarray:
    top, left, height, width = box
    return array[top:top + height, left:left + width]


def pad_bottom_right(array: np.ndarray, size: Sequence[int], value: int) -> np.ndarray:
    """Pad to at least ``size`` at the bottom and right with ``value`` (mmseg's Pad)."""
    pad_h, pad_w = max(size[0] - array.shape[0], 0), max(size[1] - array.shape[1], 0)
    if not (pad_h or pad_w):
        return array
    widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, widths, mode="constant", constant_values=value)


def _affine_uint8(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's PhotoMetricDistortion.convert: float affine map, clip, truncate back to uint8.
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, *, brightness_delta: int = 32,
                           contrast_range: Tuple[float, float] = (0.5, 1.5),
                           saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an RGB uint8 image: each step applied with probability 1/2 — brightness,
    then contrast either first or last (coin flip), saturation and hue in HSV (OpenCV's 0..179 hue)."""

    def contrast(img: np.ndarray) -> np.ndarray:
        return _affine_uint8(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    if rng.integers(2):
        image = _affine_uint8(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _affine_uint8(hsv[:, :, 1], alpha=rng.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int32) + rng.integers(-hue_delta, hue_delta)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        image = contrast(image)
    return image


def augment_train(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *, image_scale: Sequence[int],
                  ratio_range: Sequence[float], crop_size: Sequence[int], cat_max_ratio: float, flip_prob: float,
                  photometric: bool, ignore_label: int) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg/Segmenter's training pipeline: random resize -> random crop (cat_max_ratio) -> horizontal flip ->
    photometric distortion -> pad to ``crop_size`` (image 0, label ``ignore_label``)."""
    size = random_scale_size(*image.shape[:2], image_scale=image_scale, ratio_range=ratio_range, rng=rng)
    image, label = resize_image(image, size), resize_label(label, size)
    box = random_crop_box(label, crop_size, cat_max_ratio=cat_max_ratio, ignore_label=ignore_label, rng=rng)
    image, label = crop(image, box), crop(label, box)
    if rng.random() < flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]
    image = np.ascontiguousarray(image)
    if photometric:
        image = photometric_distortion(image, rng)
    return pad_bottom_right(image, crop_size, 0), pad_bottom_right(np.ascontiguousarray(label), crop_size,
                                                                   ignore_label)


def resize_test(image: np.ndarray, *, min_size: int, max_size: int, size_divisibility: int = 0) -> np.ndarray:
    """Short side to ``min_size`` with the long side at most ``max_size`` (0 = no limit), keeping the ratio
    (``min_size`` 0 keeps the size); then each side resized up to a multiple of ``size_divisibility`` (mmseg's
    ``ResizeToMultiple``, a bilinear resize rather than padding; 0 = off)."""
    size = image.shape[:2]
    if min_size > 0:
        size = rescale_size(*size, long_edge=max_size, short_edge=min_size)
    if size_divisibility > 0:
        size = tuple(-(-s // size_divisibility) * size_divisibility for s in size)
    return resize_image(image, size)

