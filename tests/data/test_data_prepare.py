"""datasets/prepare_*.py on tiny inputs in the official layouts, and the builtin datasets reading their output."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy.io import savemat

from algm_d2.data import get_dataset_dicts, read_sem_seg
from algm_d2.data.builtin_meta import PASCAL_CONTEXT_59_FULL_IDS

from .test_data_helpers import load_script, random_image, write_image, write_label


def test_prepare_ade20k(tmp_path, monkeypatch):
    base = tmp_path / "ADEChallengeData2016"
    official = np.array([[0, 1, 2], [150, 75, 0]], np.uint8)
    for split, stems in (("training", ["ADE_train_00000001", "ADE_train_00000002"]),
                         ("validation", ["ADE_val_00000001"])):
        for stem in stems:
            write_image(base / "images" / split / f"{stem}.jpg", random_image(np.random.default_rng(0), 2, 3))
            write_label(base / "annotations" / split / f"{stem}.png", official)
    load_script("prepare_ade20k").main(["--root", str(tmp_path)])
    out = read_sem_seg(str(base / "annotations_detectron2" / "validation" / "ADE_val_00000001.png"))
    assert np.array_equal(out, [[255, 0, 1], [149, 74, 255]])
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    assert len(get_dataset_dicts("ade20k_sem_seg_train")) == 2
    write_label(base / "annotations" / "training" / "ADE_train_00000003.png", np.full((2, 2), 151, np.uint8))
    with pytest.raises(ValueError, match=r"ADE_train_00000003\.png: values 151"):
        load_script("prepare_ade20k").main(["--root", str(tmp_path)])


def test_prepare_coco_stuff_remap(tmp_path):
    # stuffthingmaps values are COCO id - 1: 0 person, 12 stop sign (id 13), 91 banner (id 92), 181 wood (id 182)
    official = np.array([[0, 12, 91], [181, 255, 0]], np.uint8)
    for split in ("train2017", "val2017"):
        write_label(tmp_path / "coco" / "stuffthingmaps" / split / "000000000139.png", official)
    load_script("prepare_coco_stuff").main(["--root", str(tmp_path), "--workers", "2"])
    out = read_sem_seg(str(tmp_path / "coco" / "stuffthingmaps_detectron2" / "val2017" / "000000000139.png"))
    assert np.array_equal(out, [[0, 11, 80], [170, 255, 0]])
    write_label(tmp_path / "coco" / "stuffthingmaps" / "val2017" / "000000000285.png",
                np.array([[11, 182]], np.uint8))  # id 12 was never used; 182 is past the last id
    with pytest.raises(ValueError, match=r"000000000285\.png: values 11, 182"):
        load_script("prepare_coco_stuff").main(["--root", str(tmp_path)])


def test_prepare_pascal_context(tmp_path, monkeypatch):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("2008_000002\n2008_000003\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000007\n")
    # full labels: 2 aeroplane -> 0, 458 wood -> 58, 284 person -> 36, 1 accordion (not in the 59) -> 255
    full = np.array([[2, 458, 1], [284, 0, 2]], np.uint16)
    (voc / "trainval").mkdir()
    for image_id in ("2008_000002", "2008_000003", "2008_000007"):
        savemat(voc / "trainval" / f"{image_id}.mat", {"LabelMap": full})
        write_image(voc / "JPEGImages" / f"{image_id}.jpg", random_image(np.random.default_rng(0), 2, 3))
    write_image(voc / "JPEGImages" / "2008_000009.jpg", random_image(np.random.default_rng(0), 2, 3))
    load_script("prepare_pcontext").main(["--root", str(tmp_path)])
    out = read_sem_seg(str(voc / "annotations_detectron2" / "pc59" / "train" / "2008_000003.png"))
    assert np.array_equal(out, [[0, 58, 255], [36, 255, 0]])
    assert PASCAL_CONTEXT_59_FULL_IDS[36] == 284
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    assert [r["image_id"] for r in get_dataset_dicts("pascal_context_59_sem_seg_val")] == ["2008_000007"]
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000007\n2008_000009\n")
    with pytest.raises(FileNotFoundError, match=r"2008_000009\.mat"):
        load_script("prepare_pcontext").main(["--root", str(tmp_path)])


def test_prepare_cityscapes_from_label_ids(tmp_path, monkeypatch):
    city = tmp_path / "cityscapes"
    label_ids = np.array([[7, 8, 33], [0, 1, 26]], np.uint8)  # road, sidewalk, bicycle; unlabeled, ego; car
    for split, stem in (("train", "aachen/aachen_000000_000019"), ("val", "lindau/lindau_000000_000019")):
        write_label(city / "gtFine" / split / f"{stem}_gtFine_labelIds.png", label_ids)
        write_image(city / "leftImg8bit" / split / f"{stem}_leftImg8bit.png",
                    random_image(np.random.default_rng(0), 2, 3))
    load_script("prepare_cityscapes").main(["--root", str(tmp_path), "--from", "labelIds"])
    out = read_sem_seg(str(city / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png"))
    assert np.array_equal(out, [[0, 1, 18], [255, 255, 13]])
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    assert [r["image_id"] for r in get_dataset_dicts("cityscapes_fine_sem_seg_val")] == ["lindau/lindau_000000_000019"]


@pytest.mark.skipif(importlib.util.find_spec("cityscapesscripts") is not None, reason="cityscapesscripts installed")
def test_prepare_cityscapes_polygons_explains_the_install(tmp_path):
    with pytest.raises(ImportError, match="pip install cityscapesscripts"):
        load_script("prepare_cityscapes").main(["--root", str(tmp_path)])


def test_prepare_reports_a_missing_input_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016/annotations/training"):
        load_script("prepare_ade20k").main(["--root", str(tmp_path)])
