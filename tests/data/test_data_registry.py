"""Dataset registry, metadata, builtin on-disk layouts and custom datasets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from algm_d2.config import get_cfg
from algm_d2.data import (DATASET_REGISTRY, DatasetMetadata, DemoShapes, SemSegDatasetMapper, build_test_loader,
                          get_dataset_dicts, get_metadata, register_custom_sem_seg, register_dataset,
                          register_datasets_from_config)
from algm_d2.data.builtin_meta import COCO_STUFF_IDS, COCO_STUFF_UNUSED_IDS

from .test_data_helpers import demo_cfg, make_pairs, unique_name, write_image, write_label

BUILTIN_CLASSES = {
    "ade20k_sem_seg_train": 150, "ade20k_sem_seg_val": 150,
    "coco_2017_train_stuff_sem_seg": 171, "coco_2017_val_stuff_sem_seg": 171,
    "cityscapes_fine_sem_seg_train": 19, "cityscapes_fine_sem_seg_val": 19,
    "pascal_context_59_sem_seg_train": 59, "pascal_context_59_sem_seg_val": 59,
    "demo_shapes_train": 6, "demo_shapes_val": 6,
}


def test_builtin_metadata():
    for name, num_classes in BUILTIN_CLASSES.items():
        metadata = get_metadata(name)
        assert metadata.num_classes == num_classes, name
        assert len(metadata.stuff_colors) == num_classes and metadata.ignore_label == 255
        assert metadata.evaluator_type == "sem_seg"
        assert len(set(metadata.stuff_classes)) == num_classes, f"{name}: duplicate class names"
        assert all(all(0 <= c <= 255 for c in color) for color in metadata.stuff_colors)
    ade, coco = get_metadata("ade20k_sem_seg_val"), get_metadata("coco_2017_val_stuff_sem_seg")
    assert ade.stuff_classes[:3] == ("wall", "building", "sky") and ade.stuff_classes[-1] == "flag"
    assert coco.stuff_classes[0] == "person" and coco.stuff_classes[80] == "banner"
    assert coco.stuff_classes[-1] == "wood"
    assert get_metadata("cityscapes_fine_sem_seg_val").stuff_colors[0] == (128, 64, 128)
    pc59 = get_metadata("pascal_context_59_sem_seg_val").stuff_classes
    assert pc59[0] == "aeroplane" and pc59[-1] == "wood" and list(pc59) == sorted(pc59)


def test_coco_stuff_ids():
    assert len(COCO_STUFF_IDS) == 171 and len(set(COCO_STUFF_IDS)) == 171
    assert sum(i <= 90 for i in COCO_STUFF_IDS) == 80 and max(COCO_STUFF_IDS) == 182
    assert not set(COCO_STUFF_UNUSED_IDS) & set(COCO_STUFF_IDS)


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match="not registered.*ade20k_sem_seg_train"):
        get_metadata("no_such_dataset")


def test_register_is_idempotent_and_refuses_a_different_entry(tmp_path):
    name = unique_name(tmp_path, "demo_copy")
    metadata = get_metadata("demo_shapes_val")
    first = register_dataset(name, DemoShapes(split="val", num_images=3), metadata)
    assert register_dataset(name, DemoShapes(split="val", num_images=3), metadata) == first
    with pytest.raises(ValueError, match=name):
        register_dataset(name, DemoShapes(split="val", num_images=4), metadata)
    assert len(get_dataset_dicts(name)) == 3 and name in DATASET_REGISTRY


def test_metadata_validation():
    with pytest.raises(ValueError, match="collides"):
        DatasetMetadata(stuff_classes=("a", "b"), ignore_label=1)
    with pytest.raises(ValueError, match="colors"):
        DatasetMetadata(stuff_classes=("a", "b"), stuff_colors=((0, 0, 0),))


def _check_records(records, image_suffix, mask_suffix):
    for record in records:
        assert Path(record["file_name"]).is_file() and record["file_name"].endswith(image_suffix)
        assert Path(record["sem_seg_file_name"]).is_file() and record["sem_seg_file_name"].endswith(mask_suffix)


def _map_all(records, num_classes):
    mapper = SemSegDatasetMapper(is_train=False, num_classes=num_classes, min_size_test=0)
    for record in records:
        out = mapper(record)
        assert out["image"].shape[1:] == out["sem_seg"].shape


def test_ade20k_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    base = tmp_path / "ADEChallengeData2016"
    for folder, stems in (("training", ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"]),
                          ("validation", ["ADE_val_00000001", "ADE_val_00000002"])):
        make_pairs(base / "images" / folder, base / "annotations_detectron2" / folder, stems, num_classes=150)
    train, val = get_dataset_dicts("ade20k_sem_seg_train"), get_dataset_dicts("ade20k_sem_seg_val")
    assert [r["image_id"] for r in train] == ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"]
    assert len(val) == 2
    _check_records(train + val, ".jpg", ".png")
    _map_all(val, 150)


def test_coco_stuff_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    for split in ("train2017", "val2017"):
        make_pairs(tmp_path / "coco" / split, tmp_path / "coco" / "stuffthingmaps_detectron2" / split,
                   ["000000000009", "000000000025"], num_classes=171)
    records = get_dataset_dicts("coco_2017_val_stuff_sem_seg")
    assert [r["image_id"] for r in records] == ["000000000009", "000000000025"]
    _check_records(records, ".jpg", ".png")
    _map_all(records, 171)


def test_cityscapes_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    city = tmp_path / "cityscapes"
    for split, stems in (("train", ["aachen/aachen_000000_000019", "bochum/bochum_000000_000313"]),
                         ("val", ["frankfurt/frankfurt_000000_000294"])):
        make_pairs(city / "leftImg8bit" / split, city / "gtFine" / split, stems, num_classes=19,
                   image_suffix="_leftImg8bit.png", mask_suffix="_gtFine_labelTrainIds.png")
        # the other gtFine files of the release must not be taken for label maps
        write_label(city / "gtFine" / split / f"{stems[0]}_gtFine_labelIds.png", np.zeros((4, 4), np.uint8))
    records = get_dataset_dicts("cityscapes_fine_sem_seg_train")
    assert [r["image_id"] for r in records] == ["aachen/aachen_000000_000019", "bochum/bochum_000000_000313"]
    _check_records(records, "_leftImg8bit.png", "_gtFine_labelTrainIds.png")
    _map_all(records, 19)


def test_pascal_context_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    rng = np.random.default_rng(0)
    for stem in ["2008_000002", "2008_000003", "2008_000007", "2008_000009"]:  # JPEGImages holds every image
        write_image(voc / "JPEGImages" / f"{stem}.jpg", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    for split, stems in (("train", ["2008_000002", "2008_000007"]), ("val", ["2008_000009"])):
        for stem in stems:
            write_label(voc / "annotations_detectron2" / "pc59" / split / f"{stem}.png",
                        rng.integers(0, 59, (20, 30)).astype(np.uint8))
    train = get_dataset_dicts("pascal_context_59_sem_seg_train")
    assert [r["image_id"] for r in train] == ["2008_000002", "2008_000007"]
    assert len(get_dataset_dicts("pascal_context_59_sem_seg_val")) == 1
    _check_records(train, ".jpg", ".png")
    _map_all(train, 59)
    write_label(voc / "annotations_detectron2" / "pc59" / "val" / "2008_000010.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="2008_000010.jpg"):
        get_dataset_dicts("pascal_context_59_sem_seg_val")


def test_dataset_root_is_read_when_listing(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "ADEChallengeData2016")):
        get_dataset_dicts("ade20k_sem_seg_val")


def test_folder_errors_name_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ALGM_DATASETS", str(tmp_path))
    base = tmp_path / "ADEChallengeData2016"
    images, masks = base / "images" / "validation", base / "annotations_detectron2" / "validation"
    images.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="label map folder not found.*annotations_detectron2"):
        get_dataset_dicts("ade20k_sem_seg_val")
    masks.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no '\*\.jpg' images under .*images/validation"):
        get_dataset_dicts("ade20k_sem_seg_val")
    make_pairs(images, masks, ["a", "b"], num_classes=150)
    write_image(images / "c.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"1 images .* have no .*label map.*c\.jpg"):
        get_dataset_dicts("ade20k_sem_seg_val")


def test_custom_dataset(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("road\n  car \n\nsky\n")
    make_pairs(tmp_path / "img", tmp_path / "ann", ["x1", "sub/x2"], num_classes=3, image_suffix=".png")
    name = unique_name(tmp_path, "custom")
    entry = register_custom_sem_seg(name, str(tmp_path / "img"), str(tmp_path / "ann"), str(classes),
                                    image_ext=".png")
    assert entry.metadata.stuff_classes == ("road", "car", "sky")
    records = get_dataset_dicts(name)
    assert [r["image_id"] for r in records] == ["sub/x2", "x1"]
    _map_all(records, 3)
    # registering again with the same arguments is fine (train_net may call it more than once)
    register_custom_sem_seg(name, str(tmp_path / "img"), str(tmp_path / "ann"), str(classes), image_ext=".png")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        register_custom_sem_seg(name + "_2", str(tmp_path / "img"), str(tmp_path / "ann"),
                                str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no class names.*empty.txt"):
        register_custom_sem_seg(name + "_3", str(tmp_path / "img"), str(tmp_path / "ann"),
                                str(tmp_path / "empty.txt"))


def test_custom_dataset_from_config(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    make_pairs(tmp_path / "tr" / "img", tmp_path / "tr" / "ann", ["p", "q"], num_classes=2)
    make_pairs(tmp_path / "va" / "img", tmp_path / "va" / "ann", ["r"], num_classes=2)
    names = (unique_name(tmp_path, "cfg_train"), unique_name(tmp_path, "cfg_val"))
    image_dirs = (str(tmp_path / "tr" / "img"), str(tmp_path / "va" / "img"))
    mask_dirs = (str(tmp_path / "tr" / "ann"), str(tmp_path / "va" / "ann"))
    cfg = get_cfg()
    cfg.merge_from_list(["DATASETS.CUSTOM.NAMES", str(names), "DATASETS.CUSTOM.IMAGE_DIRS", str(image_dirs),
                         "DATASETS.CUSTOM.MASK_DIRS", str(mask_dirs),
                         "DATASETS.CUSTOM.CLASSES_FILE", str(tmp_path / "classes.txt"),
                         "DATASETS.TEST", str((names[1],)), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2",
                         "DATALOADER.NUM_WORKERS", "0"])
    loader = build_test_loader(cfg, names[1])  # registers DATASETS.CUSTOM itself
    assert [batch[0]["image_id"] for batch in loader] == ["r"]
    assert len(get_dataset_dicts(names[0])) == 2
    cfg.DATASETS.CUSTOM.MASK_DIRS = (str(tmp_path / "tr" / "ann"),)
    with pytest.raises(ValueError, match="DATASETS.CUSTOM.NAMES, IMAGE_DIRS and MASK_DIRS"):
        register_datasets_from_config(cfg)


def test_loader_checks_model_classes():
    cfg = demo_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.NUM_CLASSES is 150 .* 6 classes"):
        build_test_loader(cfg, "demo_shapes_val")
