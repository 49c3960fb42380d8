"""Models: the ALGM backbone over timm ViT/Eva, Segmenter, and detectron2's calling convention around them."""
from __future__ import annotations

import torch

from ..config import resolve_device
from .backbone.algm_vit import ALGMViT, apply_algm
from .backbone.build import SEGMENTER_VARIANTS, algm_config_from_cfg, build_eva, build_segmenter_vit
from .backbone.vit_adapter import ViTAdapter
from .heads.atm_head import ATMHead
from .heads.segmenter_heads import LinearDecoder, MaskTransformer
from .heads.setr_heads import SETRMLAHead, SETRUpHead
from .meta_arch.mask2former import Mask2Former, MergedTokenMask2Former
from .meta_arch.segmenter import Segmenter
from .meta_arch.segvit import SegViT
from .meta_arch.setr import SETR
from .meta_arch.segmentation_model import SegmentationModel
from .registry import (
    BACKBONE_REGISTRY, META_ARCH_REGISTRY, PIXEL_DECODER_REGISTRY, SEM_SEG_HEAD_REGISTRY,
    TRANSFORMER_DECODER_REGISTRY,
)

__all__ = [
    "ALGMViT", "ViTAdapter", "apply_algm", "build_eva", "Mask2Former", "MergedTokenMask2Former", "LinearDecoder", "MaskTransformer", "Segmenter", "SEGMENTER_VARIANTS",
    "SETR", "SETRUpHead", "SETRMLAHead", "SegViT", "ATMHead",
    "SegmentationModel", "algm_config_from_cfg", "build_segmenter_vit", "build_model", "BACKBONE_REGISTRY",
    "META_ARCH_REGISTRY", "PIXEL_DECODER_REGISTRY", "SEM_SEG_HEAD_REGISTRY", "TRANSFORMER_DECODER_REGISTRY",
]


def build_model(cfg) -> SegmentationModel:  # noqa: ANN001 - a CfgNode
    """The model MODEL.* describes, on MODEL.DEVICE, in training mode (detectron2's ``build_model``)."""
    model = SegmentationModel.from_config(cfg)
    return model.to(torch.device(resolve_device(cfg.MODEL.DEVICE)))
