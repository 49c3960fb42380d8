"""Image and label-map readers: files through OpenCV / Pillow, ``demo://`` URIs through the demo generator.

Errors name the file: a missing file raises ``FileNotFoundError``; an unreadable or invalid one raises
:class:`BadSampleError` (a ``ValueError``). Loaders can turn both into counted skips (DATALOADER.SKIP_BAD_SAMPLES).
"""
from __future__ import annotations

import os
from typing import Optional

import cv2
import numpy as np
from PIL import Image

from .demo import DEMO_SCHEME, render_demo_uri

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_JPEG_START_OF_SCAN = b"\xff\xda"


class BadSampleError(ValueError):
    """A file that exists but cannot be used: corrupt, truncated, wrong values, or not matching its partner."""


def _is_demo(path: str) -> bool:
    return path.startswith(DEMO_SCHEME + "://")


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    if os.path.getsize(path) == 0:
        raise BadSampleError(f"{what} file is empty: {path}")


def _check_jpeg_complete(data: np.ndarray, path: str) -> None:
    # Some OpenCV builds decode a truncated JPEG into a partly grey image with only a warning. Scan data cannot
    # contain the end-of-image marker (0xFF is byte-stuffed there), so a complete file has one after its last scan.
    raw = data.tobytes()
    if raw.startswith(_JPEG_START) and raw.rfind(_JPEG_END) < raw.rfind(_JPEG_START_OF_SCAN):
        raise BadSampleError(f"truncated JPEG (no end-of-image marker after the last scan): {path}")


def read_image(path: str) -> np.ndarray:
    """Read an image as ``[H, W, 3]`` uint8 RGB.

    Grayscale images are replicated to 3 channels, an alpha channel is dropped (not composited), 16-bit images are
    scaled to 8 bits, and EXIF orientation is ignored so pixels line up with label maps drawn on the stored pixels.
    """
    if _is_demo(path):
        return render_demo_uri(path)[0]
    _check_file(path, "image")
    data = np.fromfile(path, dtype=np.uint8)
    _check_jpeg_complete(data, path)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise BadSampleError(f"cannot decode image (corrupt, truncated or not an image): {path}")
    return np.ascontiguousarray(image[:, :, ::-1])


def read_sem_seg(path: str, *, num_classes: Optional[int] = None, ignore_label: int = 255) -> np.ndarray:
    """Read a label map as ``[H, W]`` uint8 (uint16 when values exceed 255).

    Pillow rather than OpenCV: palette PNGs (PASCAL-style masks) must give their indices, which OpenCV would expand
    to colors. With ``num_classes``, values outside ``[0, num_classes)`` other than ``ignore_label`` raise
    :class:`BadSampleError` naming the file and the values.
    """
    if _is_demo(path):
        label = render_demo_uri(path)[1]
    else:
        _check_file(path, "label map")
        try:
            with Image.open(path) as pil:
                if pil.mode not in ("L", "P", "I", "I;16", "1"):
                    raise BadSampleError(f"label map must have one channel (modes L, P, I, I;16), got mode "
                                         f"{pil.mode!r}: {path}")
                label = np.asarray(pil)
        except (OSError, SyntaxError) as error:  # Pillow: truncated/corrupt data, unknown format
            raise BadSampleError(f"cannot decode label map ({error}): {path}") from error
        except Image.DecompressionBombError as error:  # more pixels than Pillow's limit (Image.MAX_IMAGE_PIXELS)
            raise BadSampleError(f"label map too large to decode ({error}): {path}") from error
        label = _to_unsigned(label, path)
    if num_classes is not None:
        check_sem_seg_values(label, num_classes=num_classes, ignore_label=ignore_label, file_name=path)
    return label


def _to_unsigned(label: np.ndarray, path: str) -> np.ndarray:
    if label.dtype == np.bool_ or label.dtype == np.uint8:
        return label.astype(np.uint8, copy=False)
    low, high = int(label.min()), int(label.max())
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise BadSampleError(f"label values {low}..{high} do not fit 0..65535: {path}")
    return label.astype(np.uint8 if high <= 255 else np.uint16)


def check_sem_seg_values(label: np.ndarray, *, num_classes: int, ignore_label: int, file_name: str) -> None:
    """Raise :class:`BadSampleError` naming the file and the values outside ``[0, num_classes)`` ∪ {ignore}."""
    present = np.flatnonzero(np.bincount(label.ravel()))  # labels are unsigned ints; bincount beats unique
    bad = present[(present >= num_classes) & (present != ignore_label)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:20]) + (" ..." if bad.size > 20 else "")
        raise BadSampleError(f"label values outside 0..{num_classes - 1} (ignore {ignore_label}): {shown} in "
                             f"{file_name}")
