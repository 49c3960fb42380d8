"""A procedural dataset for smoke tests and demos: textured shapes on a background, generated on the fly.

Image ``i`` of split ``s`` is a pure function of ``(seed, s, i, size)``. Each class has its own color family and
texture (so a tiny ViT separates them from a 16x16 patch), and shapes are 30-60% of the image side (so whole patches
are uniform and ALGM has regions to merge). Records point at ``demo://shapes/<split>/<index>?seed=S&size=N``; the
readers render those URIs, so the demo runs through the same mapper and loader code as files do.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

DEMO_SCHEME = "demo"
DEMO_SHAPES_CLASSES: Tuple[str, ...] = ("background", "stripes", "checkerboard", "dots", "noise", "smooth")
DEMO_SHAPES_COLORS: Tuple[Tuple[int, int, int], ...] = (
    (120, 120, 120), (210, 60, 50), (50, 170, 70), (230, 200, 40), (50, 90, 210), (190, 60, 190),
)

Texture = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _background(color: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(angle) + yy * np.sin(angle)) / max(xx.shape) - 0.5
    return color + 30.0 * ramp[..., None]


def _stripes(color: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    period = rng.integers(6, 11)
    angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi
    bands = np.floor((xx * np.cos(angle) + yy * np.sin(angle)) * 2 / period) % 2
    return color * (0.55 + 0.45 * bands[..., None])


def _checkerboard(color: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cell = rng.integers(4, 7)
    squares = (yy // cell + xx // cell) % 2
    return color * (0.6 + 0.4 * squares[..., None])


def _dots(color: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    spacing = rng.integers(7, 10)
    dy, dx = yy % spacing - spacing / 2, xx % spacing - spacing / 2
    dot = (dy * dy + dx * dx) < 5.0
    return np.where(dot[..., None], color * 0.3, color)


def _noise(color: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return color + rng.normal(0.0, 45.0, size=yy.shape + (3,))


def _smooth(color: np.ndarray, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.broadcast_to(color, yy.shape + (3,))


_TEXTURES: Tuple[Texture, ...] = (_background, _stripes, _checkerboard, _dots, _noise, _smooth)


def _draw_shape(label: np.ndarray, class_id: int, rng: np.random.Generator) -> None:
    size = label.shape[0]
    side = rng.uniform(0.3, 0.6) * size
    aspect = rng.uniform(0.6, 1.0 / 0.6)
    half_w, half_h = side * np.sqrt(aspect) / 2, side / np.sqrt(aspect) / 2
    cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)
    kind = rng.integers(3)
    if kind == 0:
        cv2.rectangle(label, (int(cx - half_w), int(cy - half_h)), (int(cx + half_w), int(cy + half_h)),
                      int(class_id), thickness=-1)
    elif kind == 1:
        cv2.ellipse(label, (int(cx), int(cy)), (int(half_w), int(half_h)), float(rng.uniform(0, 180)), 0, 360,
                    int(class_id), thickness=-1)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, size=3)
        radius = side * 0.65
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
        cv2.fillConvexPoly(label, points.round().astype(np.int32), int(class_id))


def render_demo_shapes(*, seed: int, split: str, index: int, size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """Image ``[size, size, 3]`` uint8 RGB and label ``[size, size]`` uint8 (class ids 0..5) of one demo sample."""
    if size < 16:
        raise ValueError(f"demo image size must be >= 16, got {size}")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(3, 6)):
        _draw_shape(label, int(rng.integers(1, len(DEMO_SHAPES_CLASSES))), rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.zeros((size, size, 3), dtype=np.float32)
    for class_id in np.unique(label):
        color = np.asarray(DEMO_SHAPES_COLORS[class_id], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        region = label == class_id
        image[region] = _TEXTURES[class_id](color, yy, xx, rng)[region]
    image += rng.normal(0.0, 3.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def demo_shapes_uri(*, split: str, index: int, seed: int, size: int) -> str:
    return f"{DEMO_SCHEME}://shapes/{split}/{index:05d}?seed={seed}&size={size}"


def render_demo_uri(uri: str) -> Tuple[np.ndarray, np.ndarray]:
    """Render the sample a ``demo://shapes/<split>/<index>?seed=S&size=N`` URI names."""
    parts = urlsplit(uri)
    path = parts.path.strip("/").split("/")
    query = parse_qs(parts.query)
    try:
        if parts.scheme != DEMO_SCHEME or parts.netloc != "shapes" or len(path) != 2:
            raise ValueError("expected demo://shapes/<split>/<index>?seed=S&size=N")
        split, index = path[0], int(path[1])
        seed, size = int(query["seed"][0]), int(query["size"][0])
    except (ValueError, KeyError) as error:
        raise ValueError(f"malformed demo URI {uri!r}: {error}") from error
    return render_demo_shapes(seed=seed, split=split, index=index, size=size)


@dataclass(frozen=True)
class DemoShapes:
    """Records of one demo split (a dataset loader for the registry)."""

    split: str
    num_images: int
    image_size: int = 128
    seed: int = 0

    def __call__(self) -> List[Dict[str, Any]]:
        records = []
        for index in range(self.num_images):
            uri = demo_shapes_uri(split=self.split, index=index, seed=self.seed, size=self.image_size)
            records.append({"file_name": uri, "sem_seg_file_name": uri, "height": self.image_size,
                            "width": self.image_size, "image_id": f"{self.split}/{index:05d}"})
        return records
