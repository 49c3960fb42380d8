"""Registries of pluggable model parts, chosen by config strings (detectron2's names)."""
from fvcore.common.registry import Registry

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Backbones: take normalized images, return (tokens, MergeState). Key: MODEL.BACKBONE.NAME."

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = (
    "Segmentation networks: normalized images [B,3,H,W] -> class logits [B,K,H,W]. Key: MODEL.META_ARCHITECTURE."
)

SEM_SEG_HEAD_REGISTRY = Registry("SEM_SEG_HEAD")
SEM_SEG_HEAD_REGISTRY.__doc__ = "Decoders on (merged) tokens. Key: MODEL.SEM_SEG_HEAD.NAME."

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = "Mask2Former pixel decoders. Key: MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME."

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = "Mask2Former transformer decoders. Key: MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME."
