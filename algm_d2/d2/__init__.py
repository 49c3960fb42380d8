"""algm_d2 inside detectron2 and Mask2Former: registered backbones, head and meta-architectures, config, optimizer.

Importing this package registers into detectron2's registries (BACKBONE: ``build_algm_vit_backbone``,
``build_algm_vit_pyramid_backbone``, ``build_algm_vit_adapter_backbone``; SEM_SEG_HEADS:
``build_merged_token_mask2former_head``; META_ARCH: ``ALGMSegmenter``, ``ALGMMask2Former``,
``ALGMMergedTokenMask2Former``). It needs detectron2 (and Mask2Former for its configs and train_net); nothing else in
algm_d2 imports detectron2. Usage: docs/DETECTRON2.md.
"""
try:
    import detectron2  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("algm_d2.d2 needs detectron2: pip install --no-build-isolation "
                      "'git+https://github.com/facebookresearch/detectron2.git' (docs/DETECTRON2.md)") from err

from .backbone import (
    MERGED_TOKENS, ALGMViTAdapterBackbone, ALGMViTBackbone, ALGMViTPyramidBackbone, MergedTokens,
    build_algm_vit_adapter_backbone, build_algm_vit_backbone, build_algm_vit_pyramid_backbone,
)
from .checkpoint import to_maskformer_layout
from .config import CfgNode, add_algm_config, get_cfg
from .head import MergedTokenMask2FormerHead, build_merged_token_mask2former_head
from .meta_arch import ALGMMask2Former, ALGMMergedTokenMask2Former, ALGMSegmenter, BridgedSegmentor
from .optim import build_optimizer

__all__ = [
    "MERGED_TOKENS", "ALGMViTAdapterBackbone", "ALGMViTBackbone", "ALGMViTPyramidBackbone", "MergedTokens",
    "build_algm_vit_adapter_backbone", "build_algm_vit_backbone", "build_algm_vit_pyramid_backbone", "CfgNode",
    "add_algm_config", "get_cfg", "MergedTokenMask2FormerHead", "build_merged_token_mask2former_head",
    "ALGMMask2Former", "ALGMMergedTokenMask2Former", "ALGMSegmenter", "BridgedSegmentor", "build_optimizer",
    "to_maskformer_layout",
]
