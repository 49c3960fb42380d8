"""Nothing wrong passes silently: non-finite images are named (evaluation, API) or skipped (training with
DATALOADER.SKIP_BAD_SAMPLES), an evaluation with nothing evaluated fails, thresholds that can never merge warn,
and a bad variant.yml value is an error."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from algm_d2 import ALGMConfig
from algm_d2.checkpoint import NORMALIZATION, build_from_variant
from algm_d2.config import get_cfg
from algm_d2.data import BadSampleError, build_test_loader, build_train_loader, register_custom_sem_seg
from algm_d2.engine import evaluate
from algm_d2.modeling import SegmentationModel
from algm_d2.modeling.backbone.build import algm_config_from_cfg

from ..data.test_data_helpers import demo_cfg, make_pairs, unique_name
from .test_segmenter import variant

NUM_CLASSES = 3


class PixelClassifier(nn.Module):
    """A 1x1 convolution: logits [B, K, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, images):
        return self.conv(images)


def segmentor() -> SegmentationModel:
    return SegmentationModel(net=PixelClassifier(), pixel_mean=(120.0, 110.0, 100.0), pixel_std=(60.0, 60.0, 60.0))


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    make_pairs(tmp_path / "img", tmp_path / "ann", ["s0", "s1", "s2", "s3"], num_classes=NUM_CLASSES, size=(20, 20))
    name = unique_name(tmp_path, "inputs")
    register_custom_sem_seg(name, str(tmp_path / "img"), str(tmp_path / "ann"), str(tmp_path / "classes.txt"))
    cfg = demo_cfg(train=(name,), test=(name,), crop=16)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.TEST.COMPUTE_FLOPS = False
    return cfg, name


def float_mapper_with_nan_in(bad_stem):
    """A user's mapper producing float images; the one of ``bad_stem`` has a NaN pixel."""
    def mapper(record, rng):
        image = torch.full((3, 16, 16), 100.0)
        if record["file_name"].endswith(f"{bad_stem}.jpg"):
            image[1, 3, 4] = float("nan")
        return {"image": image, "sem_seg": torch.zeros(16, 16, dtype=torch.long), "file_name": record["file_name"],
                "height": 16, "width": 16}
    return mapper


def test_training_skips_a_non_finite_image_with_a_warning(dataset, caplog):
    cfg, _ = dataset
    cfg.DATALOADER.SKIP_BAD_SAMPLES = True
    loader = build_train_loader(cfg, float_mapper_with_nan_in("s2"), total_batch_size=4)
    with caplog.at_level(logging.WARNING):
        batches = [batch for _, batch in zip(range(3), loader)]
    assert all(len(batch) == 4 and all(torch.isfinite(s["image"]).all() for s in batch) for batch in batches)
    assert loader.dataset.num_skipped >= 3 and "s2.jpg has 1 non-finite values" in caplog.text


def test_non_finite_images_are_named_without_skipping(dataset):
    cfg, name = dataset
    with pytest.raises(BadSampleError, match=r"s2\.jpg has 1 non-finite values"):
        next(iter(build_train_loader(cfg, float_mapper_with_nan_in("s2"), total_batch_size=4)))
    with pytest.raises(BadSampleError, match=r"s1\.jpg has 1 non-finite values"):
        list(build_test_loader(cfg, name, float_mapper_with_nan_in("s1")))


def test_the_model_names_a_non_finite_image_in_evaluation_and_training():
    model = segmentor().eval()
    good = torch.full((3, 8, 8), 100.0)
    bad = good.clone()
    bad[0, 0, 0] = float("inf")
    assert torch.isfinite(model([{"image": good}])[0]["sem_seg"]).all()
    with pytest.raises(ValueError, match=r"image x/b\.png has 1 non-finite values"):
        model([{"image": good, "file_name": "x/a.png"}, {"image": bad, "file_name": "x/b.png"}])
    model.train()
    with pytest.raises(ValueError, match=r"image 1 of the batch has 1 non-finite"):
        model([{"image": good, "sem_seg": torch.zeros(8, 8, dtype=torch.long)},
               {"image": bad, "sem_seg": torch.zeros(8, 8, dtype=torch.long)}])


def test_an_evaluation_with_every_image_skipped_fails(dataset, tmp_path):
    cfg, name = dataset
    for image in (tmp_path / "img").iterdir():
        image.write_bytes(b"not a jpeg")
    cfg.DATALOADER.SKIP_BAD_SAMPLES = True
    with pytest.raises(RuntimeError, match=rf"evaluation of {name}: no labelled pixel was evaluated \(4 images "):
        evaluate(cfg, segmentor())


def test_a_threshold_that_can_never_merge_warns(caplog):
    cfg = get_cfg()
    cfg.MODEL.ALGM.ENABLED = True
    cfg.MODEL.ALGM.LOCAL_THRESHOLD = 1.5
    with caplog.at_level(logging.WARNING):
        algm_config_from_cfg(cfg)
    assert "MODEL.ALGM.LOCAL_THRESHOLD = 1.5 >= 1" in caplog.text and "merges nothing" in caplog.text
    caplog.clear()
    cfg.MODEL.ALGM.LOCAL_THRESHOLD = 0.88
    with caplog.at_level(logging.WARNING):
        algm_config_from_cfg(cfg)
    assert "merges nothing" not in caplog.text


def test_a_normalization_typo_in_variant_yml_is_an_error():
    bad = variant()
    bad["net_kwargs"]["normalization"] = "vitt"
    with pytest.raises(ValueError, match=r"normalization 'vitt' \(expected one of vit, deit\)"):
        build_from_variant(bad)
    assert build_from_variant(variant()).normalization == NORMALIZATION["vit"]


def test_evaluation_of_a_custom_dataset_registers_it_first(tmp_path):
    """--eval-only evaluates before any loader is built: the DATASETS.CUSTOM names must be registered first."""
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    make_pairs(tmp_path / "img", tmp_path / "ann", ["s0", "s1"], num_classes=NUM_CLASSES, size=(20, 20))
    name = unique_name(tmp_path, "custom_eval")
    cfg = demo_cfg(train=(name,), test=(name,), crop=16)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_CLASSES
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    cfg.TEST.COMPUTE_FLOPS = False
    cfg.TEST.MERGE_STATS = False
    cfg.DATASETS.CUSTOM.NAMES = (name,)
    cfg.DATASETS.CUSTOM.IMAGE_DIRS = (str(tmp_path / "img"),)
    cfg.DATASETS.CUSTOM.MASK_DIRS = (str(tmp_path / "ann"),)
    cfg.DATASETS.CUSTOM.CLASSES_FILE = str(tmp_path / "classes.txt")
    results = evaluate(cfg, segmentor())
    assert 0.0 <= results[name]["sem_seg"]["mIoU"] <= 100.0


@pytest.fixture(scope="module")
def algm_segmenter():
    torch.manual_seed(0)
    return build_from_variant(variant(), algm=ALGMConfig(local_layer=1, global_layer=3)).eval()


@pytest.mark.parametrize("images, message", [
    (torch.zeros(3, 32, 32), r"got shape \(3, 32, 32\) \(one image: add the batch dimension, images\[None\]\)"),
    (torch.zeros(1, 3, 0, 32), r"got shape \(1, 3, 0, 32\) \(an empty batch or a side of 0 pixels\)"),
    (torch.zeros(0, 3, 32, 32), r"got shape \(0, 3, 32, 32\) \(an empty batch"),
    (np.zeros((1, 3, 32, 32), dtype=np.float32), r"got a ndarray \(convert it"),
    ([torch.zeros(3, 32, 32)], r"got a list \(convert it"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"got dtype torch.uint8 \(normalize"),
    (torch.zeros(1, 1, 32, 32), r"got shape \(1, 1, 32, 32\)"),
])
def test_the_inference_api_names_the_expected_shape(algm_segmenter, images, message):
    for call in (algm_segmenter, algm_segmenter.predict_labels, algm_segmenter.backbone):
        with pytest.raises(ValueError, match=r"images must be a float tensor \[B, 3, H, W\] with B, H, W >= 1, "
                                             + message):
            call(images)


def test_detectron2_style_inputs_are_checked():
    model = segmentor().eval()
    with pytest.raises(ValueError, match=r"non-empty list of dicts .* got list \(empty\)"):
        model([])
    with pytest.raises(ValueError, match=r"input a.png: 'image' must be a tensor \[3, H, W\] .* got shape \(1, 3, 8"):
        model([{"image": torch.zeros(1, 3, 8, 8), "file_name": "a.png"}])
    with pytest.raises(ValueError, match=r"input 0 of the batch: 'image' must be a tensor .* got a ndarray"):
        model([{"image": np.zeros((3, 8, 8), dtype=np.uint8)}])
    with pytest.raises(ValueError, match=r"got shape \(3, 0, 8\)"):
        model([{"image": torch.zeros(3, 0, 8, dtype=torch.uint8)}])
