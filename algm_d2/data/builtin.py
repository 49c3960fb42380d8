"""The builtin datasets, registered when :mod:`algm_d2.data` is imported.

Folders are relative to ``$ALGM_DATASETS`` (default ``./datasets``), read when the records are listed; the trees
and the scripts that write the label maps are described in ``datasets/README.md``.
"""
from __future__ import annotations

from .builtin_meta import (ADE20K_150_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_COLORS, COCO_STUFF_171_CLASSES,
                           PASCAL_CONTEXT_59_CLASSES)
from .catalog import DatasetMetadata, register_dataset
from .demo import DEMO_SHAPES_CLASSES, DEMO_SHAPES_COLORS, DemoShapes
from .folders import SemSegFolders

# Sizes of the builtin demo splits (128x128 images; any other size: register_dataset(name, DemoShapes(...), ...)).
DEMO_NUM_TRAIN, DEMO_NUM_VAL = 1000, 100


def register_all_builtin() -> None:
    ade20k = DatasetMetadata(stuff_classes=ADE20K_150_CLASSES)
    for split, folder in (("train", "training"), ("val", "validation")):
        register_dataset(f"ade20k_sem_seg_{split}", SemSegFolders(
            image_dir=f"ADEChallengeData2016/images/{folder}",
            mask_dir=f"ADEChallengeData2016/annotations_detectron2/{folder}",
            image_suffix=".jpg", mask_suffix=".png", under_dataset_root=True), ade20k)

    coco_stuff = DatasetMetadata(stuff_classes=COCO_STUFF_171_CLASSES)
    for split in ("train", "val"):
        register_dataset(f"coco_2017_{split}_stuff_sem_seg", SemSegFolders(
            image_dir=f"coco/{split}2017", mask_dir=f"coco/stuffthingmaps_detectron2/{split}2017",
            image_suffix=".jpg", mask_suffix=".png", under_dataset_root=True), coco_stuff)

    cityscapes = DatasetMetadata(stuff_classes=CITYSCAPES_CLASSES, stuff_colors=CITYSCAPES_COLORS)
    for split in ("train", "val"):
        register_dataset(f"cityscapes_fine_sem_seg_{split}", SemSegFolders(
            image_dir=f"cityscapes/leftImg8bit/{split}", mask_dir=f"cityscapes/gtFine/{split}",
            image_suffix="_leftImg8bit.png", mask_suffix="_gtFine_labelTrainIds.png", under_dataset_root=True),
            cityscapes)

    pascal_context = DatasetMetadata(stuff_classes=PASCAL_CONTEXT_59_CLASSES)
    for split in ("train", "val"):
        register_dataset(f"pascal_context_59_sem_seg_{split}", SemSegFolders(
            image_dir="VOCdevkit/VOC2010/JPEGImages",
            mask_dir=f"VOCdevkit/VOC2010/annotations_detectron2/pc59/{split}",
            image_suffix=".jpg", mask_suffix=".png", under_dataset_root=True, images_from_masks=True),
            pascal_context)

    demo = DatasetMetadata(stuff_classes=DEMO_SHAPES_CLASSES, stuff_colors=DEMO_SHAPES_COLORS)
    register_dataset("demo_shapes_train", DemoShapes(split="train", num_images=DEMO_NUM_TRAIN), demo)
    register_dataset("demo_shapes_val", DemoShapes(split="val", num_images=DEMO_NUM_VAL), demo)
