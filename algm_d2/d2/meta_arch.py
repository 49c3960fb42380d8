"""algm_d2's own segmentation networks as detectron2 meta-architectures (detectron2's META_ARCH registry).

MODEL.META_ARCHITECTURE ``ALGMSegmenter``, ``ALGMMask2Former`` or ``ALGMMergedTokenMask2Former`` builds algm_d2's
``Segmenter``, ``Mask2Former`` (EVA + ViT-Adapter + Mask2Former) or ``MergedTokenMask2Former`` from algm_d2's keys
(MODEL.BACKBONE.NAME and MODEL.SEM_SEG_HEAD.NAME name algm_d2's registered parts here, e.g. "ALGMViT",
"MaskTransformer") inside :class:`~algm_d2.modeling.SegmentationModel`: detectron2's inputs (``"image"`` uint8 RGB,
``"sem_seg"`` in training, ``"height"``/``"width"``), the network's own losses, and whole-image or sliding-window
inference (TEST.MODE, TEST.CROP_SIZE, TEST.STRIDE, TEST.BATCH_SIZE); detectron2's TEST.AUG runs through Mask2Former's
test-time augmentation. Parameter names are those of algm_d2's SegmentationModel (``net.backbone.*``), so
detectron2's ``model_final.pth`` loads into algm_d2's ``train_net.py`` and algm_d2's ``model.pth`` into detectron2;
state dicts in the network's own (released) layout under ``"model"`` (Segmenter's ``checkpoint.pth``:
``encoder.*`` / ``decoder.*``; EVA's ``backbone.*`` / ``decode_head.*`` re-saved from mmcv's ``"state_dict"``) load
as they are.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, List

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from ..checkpoint.segmenter import DROPPED_PREFIXES
from ..modeling import META_ARCH_REGISTRY as ALGM_META_ARCH_REGISTRY
from ..modeling import SegmentationModel
from .backbone import check_input_format, with_pretrained

logger = logging.getLogger(__name__)
NET = "net."


def _load_release_layout(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str, *args: Any) -> None:
    """A checkpoint without ``net.`` keys is in the network's (released) layout: load it into ``net``, leaving out
    the ImageNet classifier of Segmenter's release as algm_d2's loader does."""
    keys: List[str] = [k for k in state_dict if k.startswith(prefix)]
    if not keys or any(k.startswith(prefix + NET) for k in keys):
        return
    dropped = []
    for key in keys:
        name = key[len(prefix):]
        value = state_dict.pop(key)
        if name.startswith(DROPPED_PREFIXES):
            dropped.append(name)
        else:
            state_dict[prefix + NET + name] = value
    logger.info("loading a checkpoint in the network's own layout into %s.net%s", type(module).__name__,
                f" (dropped {len(dropped)} keys not used for segmentation: {', '.join(dropped)})" if dropped else "")


class BridgedSegmentor(SegmentationModel):
    """algm_d2's SegmentationModel around the algm_d2 network ``net_name``, built by detectron2 from a config
    (detectron2's protocol: ``from_config`` returns the constructor's arguments)."""

    net_name: ClassVar[str] = ""

    @configurable
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_load_state_dict_pre_hook(_load_release_layout)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:  # type: ignore[override]  # noqa: ANN001 - a CfgNode
        check_input_format(cfg)
        net = ALGM_META_ARCH_REGISTRY.get(cls.net_name).from_config(cfg)
        with_pretrained(net.backbone, cfg)
        return {"net": net, **SegmentationModel.config_kwargs(cfg)}  # detectron2's TEST.AUG does scales and flips


@META_ARCH_REGISTRY.register()
class ALGMSegmenter(BridgedSegmentor):
    """algm_d2's Segmenter (ViT with ALGM + mask transformer or linear decoder on the merged tokens)."""

    net_name = "Segmenter"


@META_ARCH_REGISTRY.register()
class ALGMMask2Former(BridgedSegmentor):
    """algm_d2's EVA/ViT + ViT-Adapter (ALGM inside the ViT) + Mask2Former, with EVA's module names."""

    net_name = "Mask2Former"


@META_ARCH_REGISTRY.register()
class ALGMMergedTokenMask2Former(BridgedSegmentor):
    """algm_d2's plain ViT with ALGM + the Mask2Former decoder on merged tokens."""

    net_name = "MergedTokenMask2Former"
