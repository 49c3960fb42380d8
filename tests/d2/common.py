"""Shared by the detectron2 bridge tests: tiny versions of configs/detectron2/ and a tiny dataset on disk."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (docs/DETECTRON2.md installs it)")
try:
    import mask2former  # noqa: F401
except ImportError as err:
    raise ImportError("detectron2 is installed but Mask2Former is not importable: put the Mask2Former checkout and "
                      "a MultiScaleDeformableAttention op (or a stand-in that raises) on PYTHONPATH "
                      "(docs/DETECTRON2.md; .ci/run does)") from err

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from algm_d2.d2 import CfgNode, get_cfg  # noqa: E402
from algm_d2.data.demo import render_demo_shapes  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "detectron2" / "ade20k"
NUM_CLASSES = 6
SIZE = 64

TINY_ENCODER = [
    "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.IMG_SIZE", SIZE, "MODEL.BACKBONE.EMBED_DIM", 64, "MODEL.BACKBONE.DEPTH", 4,
    "MODEL.BACKBONE.NUM_HEADS", 4, "MODEL.BACKBONE.MLP_RATIO", 2.0, "MODEL.BACKBONE.DROP_PATH_RATE", 0.0,
    "MODEL.BACKBONE.ACTIVATION_CHECKPOINTING", False, "MODEL.ALGM.GLOBAL_LAYER", 3,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_CLASSES,
]
TINY_ADAPTER = [
    "MODEL.VIT_ADAPTER.CONV_INPLANE", 16, "MODEL.VIT_ADAPTER.DEFORM_NUM_HEADS", 4, "MODEL.VIT_ADAPTER.N_POINTS", 2,
    "MODEL.VIT_ADAPTER.INTERACTION_INDEXES", [[0, 0], [1, 1], [2, 2], [3, 3]],
]
TINY_MASK2FORMER = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", 1, "MODEL.MASK_FORMER.HIDDEN_DIM", 32,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8, "MODEL.MASK_FORMER.NHEADS", 4, "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64,
    "MODEL.MASK_FORMER.DEC_LAYERS", 3, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 256,
]
# Mask2Former's ADE20K pipeline at 64 px: one training scale, 64×64 crops padded to 64, test images kept at 64.
TINY_INPUT = [
    "INPUT.MIN_SIZE_TRAIN", (SIZE,), "INPUT.MAX_SIZE_TRAIN", SIZE, "INPUT.CROP.SIZE", (SIZE, SIZE),
    "INPUT.SIZE_DIVISIBILITY", SIZE, "INPUT.MIN_SIZE_TEST", SIZE, "INPUT.MAX_SIZE_TEST", SIZE,
    "DATALOADER.NUM_WORKERS", 0, "SOLVER.AMP.ENABLED", False,
]
# The ALGM thresholds that make the tiny random models merge: CLAP merges windows whose mean cosine >= 0.3.
MERGING = ["MODEL.ALGM.LOCAL_THRESHOLD", 0.3]
# The bridged segmentors' sliding window at 64 px: 32-px crops every 16 px, 4 crops per forward.
SLIDE_TEST = ["TEST.CROP_SIZE", 32, "TEST.STRIDE", 16, "TEST.BATCH_SIZE", 4]


def tiny_cfg(config: str, *extra: Sequence[object]) -> CfgNode:
    """``configs/detectron2/ade20k/<config>`` at tiny sizes (what the test's model needs in ``extra``)."""
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / config))
    overrides: List[object] = TINY_ENCODER + TINY_INPUT
    for part in extra:
        overrides += list(part)
    cfg.merge_from_list(overrides)
    return cfg


def adapter_cfg(*extra: Sequence[object]) -> CfgNode:
    return tiny_cfg("maskformer2_eva01_vit_adapter_896_algm.yaml", TINY_ADAPTER, TINY_MASK2FORMER, *extra)


def merged_token_cfg(*extra: Sequence[object]) -> CfgNode:
    return tiny_cfg("maskformer2_vit_base_merged_tokens_512_algm.yaml", TINY_MASK2FORMER, MERGING, *extra)


def register_tiny_dataset(root: Path, name: str, count: int, seed: int = 0) -> str:
    """``count`` procedural images (``root/images/*.jpg``) and labels (``root/labels/*.png``, 0..5) registered in
    detectron2's catalogs as a semantic-segmentation dataset named ``name`` (evaluated by SemSegEvaluator)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        image, label = render_demo_shapes(seed=seed, split=name, index=i, size=SIZE)
        image_path, label_path = root / "images" / f"{i:03d}.jpg", root / "labels" / f"{i:03d}.png"
        cv2.imwrite(str(image_path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(label_path), label.astype(np.uint8))
        records.append({"file_name": str(image_path), "sem_seg_file_name": str(label_path), "height": SIZE,
                        "width": SIZE, "image_id": i})
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=[f"class{k}" for k in range(NUM_CLASSES)], ignore_label=255,
                                  evaluator_type="sem_seg")
    return name
