"""The procedural demo dataset: determinism, class balance, learnable cues, and URI records."""
from __future__ import annotations

import numpy as np
import pytest

from algm_d2.data import DemoShapes, get_dataset_dicts, read_image, read_sem_seg, render_demo_shapes
from algm_d2.data.demo import DEMO_SHAPES_CLASSES

NUM_CLASSES = len(DEMO_SHAPES_CLASSES)


@pytest.fixture(scope="module")
def samples():
    return [render_demo_shapes(seed=0, split="train", index=i, size=128) for i in range(80)]


def test_pure_function_of_seed_split_index():
    image, label = render_demo_shapes(seed=0, split="train", index=12)
    again_image, again_label = render_demo_shapes(seed=0, split="train", index=12)
    assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8 and label.dtype == np.uint8
    for other in ({"seed": 1, "split": "train", "index": 12}, {"seed": 0, "split": "val", "index": 12},
                  {"seed": 0, "split": "train", "index": 13}):
        assert not np.array_equal(render_demo_shapes(**other)[1], label), other


def test_class_balance(samples):
    pixels = np.zeros(NUM_CLASSES)
    images_with = np.zeros(NUM_CLASSES)
    for _, label in samples:
        counts = np.bincount(label.ravel(), minlength=NUM_CLASSES)
        assert counts.size == NUM_CLASSES, "labels outside the classes"
        pixels += counts
        images_with += counts > 0
    fractions = pixels / pixels.sum()
    assert 0.35 < fractions[0] < 0.7, fractions
    assert fractions[1:].min() > 0.05 and fractions[1:].max() < 2 * fractions[1:].min(), fractions
    assert (images_with[1:] / len(samples)).min() > 0.35, images_with


def test_classes_have_distinct_colors(samples):
    # mean color of each class over all samples: a tiny model can separate them from color alone
    sums, counts = np.zeros((NUM_CLASSES, 3)), np.zeros(NUM_CLASSES)
    for image, label in samples:
        for class_id in range(NUM_CLASSES):
            region = label == class_id
            sums[class_id] += image[region].sum(axis=0)
            counts[class_id] += region.sum()
    means = sums / counts[:, None]
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(NUM_CLASSES, dtype=bool)].min() > 40, means


def test_regions_fill_whole_patches(samples):
    # ALGM needs uniform 16x16 patches to merge: most patches hold a single class
    uniform = total = 0
    for _, label in samples:
        patches = label.reshape(8, 16, 8, 16).transpose(0, 2, 1, 3).reshape(64, -1)
        uniform += int((patches == patches[:, :1]).all(axis=1).sum())
        total += 64
    assert uniform / total > 0.5


def test_records_use_demo_uris_through_the_readers():
    records = get_dataset_dicts("demo_shapes_val")
    assert len(records) == 100 and records[7]["file_name"].startswith("demo://shapes/val/00007")
    image, label = render_demo_shapes(seed=0, split="val", index=7, size=128)
    assert np.array_equal(read_image(records[7]["file_name"]), image)
    assert np.array_equal(read_sem_seg(records[7]["sem_seg_file_name"], num_classes=NUM_CLASSES), label)
    small = DemoShapes(split="train", num_images=2, image_size=32, seed=3)()
    assert read_image(small[1]["file_name"]).shape == (32, 32, 3) and small[1]["height"] == 32
    with pytest.raises(ValueError, match="malformed demo URI"):
        read_image("demo://shapes/train?seed=0&size=128")
