"""Mask2Former (pixel decoder, masked-attention decoders, set criterion) with mmcv/mmdet module names."""
from .criterion import HungarianMatcher, SetCriterion, point_sample, semantic_to_instance_targets
from .head import (
    Mask2FormerHead, MergedTokenMaskedTransformerDecoder, MultiScaleMaskedTransformerDecoder, semantic_inference,
)
from .pixel_decoder import MSDeformAttnPixelDecoder

__all__ = [
    "HungarianMatcher", "SetCriterion", "point_sample", "semantic_to_instance_targets", "Mask2FormerHead",
    "MergedTokenMaskedTransformerDecoder", "MultiScaleMaskedTransformerDecoder", "semantic_inference",
    "MSDeformAttnPixelDecoder",
]
