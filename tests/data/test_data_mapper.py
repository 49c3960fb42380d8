"""The dataset mapper and its transforms: shapes, dtypes, padding, ignore label, crops, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from algm_d2.data import SemSegDatasetMapper
from algm_d2.data.transforms import photometric_distortion, random_crop_box, rescale_size

from .test_data_helpers import demo_cfg, random_image, write_image, write_label

NUM_CLASSES = 5


@pytest.fixture
def sample(tmp_path):
    rng = np.random.default_rng(0)
    label = rng.integers(0, NUM_CLASSES, (30, 40)).astype(np.uint8)
    label[:3] = 255
    image = random_image(rng, 30, 40)
    record = {"file_name": str(write_image(tmp_path / "img.png", image)),
              "sem_seg_file_name": str(write_label(tmp_path / "lab.png", label)), "image_id": "img"}
    return record, image, label


def _mapper(is_train=True, **kwargs):
    return SemSegDatasetMapper(is_train=is_train, num_classes=NUM_CLASSES, **kwargs)


def test_train_output_contract(sample):
    record, _, _ = sample
    out = _mapper(image_scale=(160, 40), crop_size=(32, 48))(record, np.random.default_rng(1))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 32, 48)
    assert out["sem_seg"].dtype == torch.long and out["sem_seg"].shape == (32, 48)
    assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (30, 40, record["file_name"], "img")
    values = set(out["sem_seg"].unique().tolist())
    assert values <= set(range(NUM_CLASSES)) | {255}


def test_padding_and_ignore_without_randomness(sample):
    record, image, label = sample
    # ratio 1 and a scale that keeps 30x40; crop larger than the image: nothing random is left but the pad
    mapper = _mapper(image_scale=(40, 30), ratio_range=(1.0, 1.0), crop_size=(36, 50), flip_prob=0.0,
                     photometric_distortion=False)
    out = mapper(record, np.random.default_rng(0))
    assert np.array_equal(out["image"][:, :30, :40].permute(1, 2, 0).numpy(), image)
    assert np.array_equal(out["sem_seg"][:30, :40].numpy(), label)
    assert out["image"][:, 30:].eq(0).all() and out["image"][:, :, 40:].eq(0).all()
    assert out["sem_seg"][30:].eq(255).all() and out["sem_seg"][:, 40:].eq(255).all()


def test_flip(sample):
    record, image, label = sample
    fixed = dict(image_scale=(40, 30), ratio_range=(1.0, 1.0), crop_size=(30, 40), photometric_distortion=False)
    flipped = _mapper(flip_prob=1.0, **fixed)(record, np.random.default_rng(0))
    assert np.array_equal(flipped["image"].permute(1, 2, 0).numpy(), image[:, ::-1])
    assert np.array_equal(flipped["sem_seg"].numpy(), label[:, ::-1])
    kept = _mapper(flip_prob=0.0, **fixed)(record, np.random.default_rng(0))
    assert np.array_equal(kept["sem_seg"].numpy(), label)


def test_random_resize_is_mmseg_ratio_range(sample):
    record, _, _ = sample
    # crop larger than any resized image: the unpadded area gives the resized size
    mapper = _mapper(image_scale=(80, 60), ratio_range=(0.5, 2.0), crop_size=(130, 170), flip_prob=0.0,
                     photometric_distortion=False)
    heights = []
    for seed in range(30):
        sem_seg = mapper(record, np.random.default_rng(seed))["sem_seg"]
        heights.append(int((sem_seg != 255).any(dim=1).nonzero().max()) + 1)
        # mmseg: scale (int(80 r), int(60 r)), then fit 30x40 inside it keeping the ratio
        ratio = np.random.default_rng(seed).uniform(0.5, 2.0)
        factor = min(int(80 * ratio) / 40, int(60 * ratio) / 30)
        assert heights[-1] == int(30 * factor + 0.5)
    assert min(heights) < 45 and max(heights) > 100


def test_determinism(sample):
    record, _, _ = sample
    mapper = _mapper(image_scale=(160, 40), crop_size=(24, 24))
    a, b = mapper(record, np.random.default_rng(5)), mapper(record, np.random.default_rng(5))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["sem_seg"], b["sem_seg"])
    others = [mapper(record, np.random.default_rng(seed))["image"] for seed in range(6, 10)]
    assert any(not torch.equal(a["image"], other) for other in others)


def test_test_mapper_resizes_image_only(sample):
    record, _, label = sample
    out = _mapper(is_train=False, min_size_test=15, max_size_test=0)(record)
    assert out["image"].shape == (3, 15, 20) and out["image"].dtype == torch.uint8
    assert np.array_equal(out["sem_seg"].numpy(), label) and (out["height"], out["width"]) == (30, 40)
    assert _mapper(is_train=False, min_size_test=15, max_size_test=16)(record)["image"].shape == (3, 12, 16)
    assert _mapper(is_train=False, min_size_test=0)(record)["image"].shape == (3, 30, 40)
    unlabelled = _mapper(is_train=False)({"file_name": record["file_name"]})
    assert "sem_seg" not in unlabelled
    with pytest.raises(ValueError, match="no 'sem_seg_file_name'"):
        _mapper()({"file_name": record["file_name"]})


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(512, 683, long_edge=2048, short_edge=512) == (512, 683)
    assert rescale_size(300, 400, long_edge=2048, short_edge=512) == (512, 683)  # int(682.67 + 0.5)
    assert rescale_size(100, 1000, long_edge=2048, short_edge=512) == (205, 2048)  # long side limits
    assert rescale_size(100, 1000, long_edge=0, short_edge=512) == (512, 5120)


def test_cat_max_ratio_prefers_mixed_crops():
    label = np.zeros((100, 100), np.uint8)
    label[:, 80:] = 1

    def mixed_rate(ratio):
        mixed = 0
        for seed in range(200):
            top, left, h, w = random_crop_box(label, (30, 30), cat_max_ratio=ratio, ignore_label=255,
                                              rng=np.random.default_rng(seed))
            counts = np.bincount(label[top:top + h, left:left + w].ravel(), minlength=2)
            mixed += counts.max() / counts.sum() < 0.75
        return mixed / 200

    assert mixed_rate(1.0) < 0.3 and mixed_rate(0.75) > 0.7


def test_cat_max_ratio_ignores_the_ignore_label():
    # 90% ignore, the rest evenly two classes: every first draw is acceptable, so it is kept
    label = np.full((60, 60), 255, np.uint8)
    label[::10, ::2] = 0
    label[::10, 1::2] = 1
    for seed in range(20):
        first = np.random.default_rng(seed)
        expected = (int(first.integers(0, 31)), int(first.integers(0, 31)))
        top, left, _, _ = random_crop_box(label, (30, 30), cat_max_ratio=0.75, ignore_label=255,
                                          rng=np.random.default_rng(seed))
        assert (top, left) == expected


def test_photometric_distortion():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outs = [photometric_distortion(image, np.random.default_rng(seed)) for seed in range(20)]
    assert all(out.dtype == np.uint8 and out.shape == image.shape for out in outs)
    assert np.array_equal(outs[3], photometric_distortion(image, np.random.default_rng(3)))
    assert sum(not np.array_equal(out, image) for out in outs) >= 15  # 1 - 1/16 chance of changing
    means = [out.astype(float).mean() for out in outs]
    assert max(means) - min(means) > 10


def test_from_config():
    cfg = demo_cfg(crop=48)
    cfg.INPUT.FLIP_PROB = 0.25
    mapper = SemSegDatasetMapper.from_config(cfg, is_train=True)
    assert (mapper.num_classes, mapper.ignore_label, mapper.crop_size, mapper.flip_prob) == (6, 255, (48, 48), 0.25)
    assert SemSegDatasetMapper.from_config(cfg, is_train=False).min_size_test == 48
