"""A Mask2Former head on ALGM's merged tokens for Mask2Former's own ``MaskFormer`` meta-architecture.

Registered in detectron2's SEM_SEG_HEADS registry as ``build_merged_token_mask2former_head`` (MODEL.SEM_SEG_HEAD.NAME)
with a backbone that outputs ``"merged_tokens"`` (``build_algm_vit_backbone``): the masked-attention decoder
cross-attends to the merged tokens and unmerges its mask logits to the patch grid after the decoder; Mask2Former's
``MaskFormer`` then upsamples them, matches and computes its losses, and runs its semantic inference. The
parameters are algm_d2's :class:`MergedTokenMaskedTransformerDecoder`'s (``sem_seg_head.layers.0.*`` for algm_d2's
``decoder.layers.0.*``).
"""
from __future__ import annotations

from typing import Any, Dict

from detectron2.layers import ShapeSpec
from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY

from ..modeling.mask2former import MergedTokenMaskedTransformerDecoder
from .backbone import MERGED_TOKENS, MergedTokens


class MergedTokenMask2FormerHead(MergedTokenMaskedTransformerDecoder):
    """:class:`MergedTokenMaskedTransformerDecoder` reading the backbone's ``"merged_tokens"`` output; predictions
    ``{"pred_logits" [B, Q, K+1], "pred_masks" [B, Q, H/p, W/p], "aux_outputs"}`` as Mask2Former's decoders."""

    def __init__(self, *, num_classes: int, **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.num_classes = num_classes  # read by MaskFormer's criterion

    def forward(self, features: Dict[str, Any]) -> Dict[str, Any]:  # type: ignore[override]
        merged: MergedTokens = features[MERGED_TOKENS]
        return super().forward(merged.tokens, merged.state, prop_attn=merged.prop_attn)


@SEM_SEG_HEADS_REGISTRY.register()
def build_merged_token_mask2former_head(cfg, input_shape: Dict[str, ShapeSpec]  # noqa: ANN001 - a CfgNode
                                        ) -> MergedTokenMask2FormerHead:
    if MERGED_TOKENS not in input_shape:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NAME build_merged_token_mask2former_head decodes the backbone's "
                         f"{MERGED_TOKENS!r} output (MODEL.BACKBONE.NAME build_algm_vit_backbone); "
                         f"{cfg.MODEL.BACKBONE.NAME!r} outputs {sorted(input_shape)}")
    return MergedTokenMask2FormerHead.from_config(cfg, in_channels=input_shape[MERGED_TOKENS].channels)
