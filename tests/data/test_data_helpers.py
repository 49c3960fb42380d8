"""Helpers for the data tests (no tests here): tiny synthetic files in the real on-disk layouts, configs."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Sequence, Tuple

import cv2
import numpy as np

from algm_d2.config import get_cfg

REPO = Path(__file__).resolve().parents[2]


def write_image(path: Path, image: np.ndarray) -> Path:
    """Write an RGB (or gray / RGBA) uint8 array with OpenCV (which wants BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[:, :, ::-1]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, [2, 1, 0, 3]]
    assert cv2.imwrite(str(path), np.ascontiguousarray(image)), path
    return path


def write_label(path: Path, label: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(label)), path
    return path


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def random_label(rng: np.random.Generator, height: int, width: int, num_classes: int,
                 ignore: int = 255) -> np.ndarray:
    label = rng.integers(0, num_classes, size=(height, width)).astype(np.uint8)
    label[:2] = ignore
    return label


def make_pairs(image_dir: Path, mask_dir: Path, stems: Sequence[str], *, num_classes: int,
               image_suffix: str = ".jpg", mask_suffix: str = ".png", size: Tuple[int, int] = (24, 32),
               seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for stem in stems:
        write_image(image_dir / f"{stem}{image_suffix}", random_image(rng, *size))
        write_label(mask_dir / f"{stem}{mask_suffix}", random_label(rng, *size, num_classes))


def load_script(name: str) -> ModuleType:
    """Import ``datasets/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_cfg(train: Sequence[str] = ("demo_shapes_train",), test: Sequence[str] = ("demo_shapes_val",),
             crop: int = 64):
    """A config for the demo dataset with small crops and loading in the main process."""
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 6
    cfg.INPUT.IMAGE_SCALE = (4 * crop, crop)
    cfg.INPUT.CROP_SIZE = (crop, crop)
    cfg.INPUT.MIN_SIZE_TEST = crop
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def unique_name(tmp_path: Path, prefix: str) -> str:
    """A dataset name unique to this test (the registry is process-wide)."""
    return f"{prefix}_{tmp_path.name}"
