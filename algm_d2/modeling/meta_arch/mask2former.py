"""Mask2Former networks with ALGM: EVA/ViT + ViT-Adapter + Mask2Former, and the plain-ViT variant on merged tokens.

Both map normalized images ``[B, 3, H, W]`` to per-class scores ``[B, K, H, W]`` (softmax(class) without "no object"
× sigmoid(mask), summed over queries: already probability-like, so the segmentor averages them without a softmax)
and train with the set criterion. Module names are EVA's release (``backbone.*``, ``decode_head.*``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ...merge import MergeState
from ..backbone.algm_vit import ALGMViT
from ..backbone.vit_adapter import ViTAdapter
from ..mask2former import SetCriterion, semantic_inference, semantic_to_instance_targets
from ..ops.attention_kernels import dynamic_length_attention
from ..registry import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEAD_REGISTRY, TRANSFORMER_DECODER_REGISTRY
from .merging import MergingNetwork
from .segmenter import pad_to_multiple


class MaskClassificationNet(MergingNetwork, nn.Module):
    """Shared by the Mask2Former networks: padding, semantic inference, losses, ALGM switches and merge stats."""

    output_kind = "probabilities"

    def __init__(self, *, backbone: Union[ALGMViT, ViTAdapter], criterion: SetCriterion, num_classes: int,
                 ignore_value: int, size_divisibility: int) -> None:
        super().__init__()
        self.backbone = backbone
        # No weights; its class-weight buffer is non-persistent, so checkpoints keep the release's keys.
        self.criterion = criterion
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.size_divisibility = max(size_divisibility, backbone.patch_size[0])
        self._last_state: Optional[MergeState] = None

    def predict(self, images: Tensor) -> Dict[str, Any]:
        """Padded images → ``{"pred_logits" [B,Q,K+1], "pred_masks" [B,Q,h,w], "aux_outputs": [...]}``."""
        raise NotImplementedError

    def _predictions(self, images: Tensor) -> Tuple[Dict[str, Any], Tuple[int, int]]:
        padded = pad_to_multiple(images, self.size_divisibility)
        return self.predict(padded), tuple(padded.shape[-2:])

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        outputs, padded_size = self._predictions(images)
        # EVA's order: class-weighted mask scores at the mask resolution, then resized to the input.
        scores = semantic_inference(outputs["pred_logits"], outputs["pred_masks"])
        scores = F.interpolate(scores, size=padded_size, mode="bilinear", align_corners=False)
        return scores[..., :height, :width]

    def losses(self, images: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """Set-criterion losses for ``images`` and semantic labels ``targets [B, H, W]`` (``ignore_value`` ignored)."""
        outputs, padded_size = self._predictions(images)
        pad = (0, padded_size[1] - targets.shape[-1], 0, padded_size[0] - targets.shape[-2])
        targets = F.pad(targets, pad, value=self.ignore_value)
        instances = [semantic_to_instance_targets(t, self.ignore_value) for t in targets]
        return self.criterion(outputs, instances)


@META_ARCH_REGISTRY.register()
class Mask2Former(MaskClassificationNet):
    """ViT-Adapter backbone (ALGM inside its ViT) → pixel decoder → masked-attention decoder (EVA's ADE20K model)."""

    def __init__(self, *, backbone: ViTAdapter, decode_head: nn.Module, criterion: SetCriterion, num_classes: int,
                 ignore_value: int = 255, size_divisibility: int = 32) -> None:
        super().__init__(backbone=backbone, criterion=criterion, num_classes=num_classes, ignore_value=ignore_value,
                         size_divisibility=size_divisibility)
        self.decode_head = decode_head

    @classmethod
    def from_config(cls, cfg) -> "Mask2Former":  # noqa: ANN001 - a CfgNode
        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME).from_config(cfg)
        if not isinstance(backbone, ViTAdapter):
            raise ValueError(f"MODEL.BACKBONE.NAME: Mask2Former reads a feature pyramid (ViTAdapter), got "
                             f"{cfg.MODEL.BACKBONE.NAME!r}; the plain-ViT variant is MergedTokenMask2Former")
        head = cfg.MODEL.SEM_SEG_HEAD
        decode_head = SEM_SEG_HEAD_REGISTRY.get(head.NAME).from_config(cfg, in_channels=[backbone.embed_dim] * 4)
        return cls(backbone=backbone, decode_head=decode_head, criterion=SetCriterion.from_config(cfg),
                   num_classes=head.NUM_CLASSES, ignore_value=head.IGNORE_VALUE,
                   size_divisibility=cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY)

    def predict(self, images: Tensor) -> Dict[str, Any]:
        features, self._last_state = self.backbone(images)
        return self.decode_head(features)


@META_ARCH_REGISTRY.register()
class MergedTokenMask2Former(MaskClassificationNet):
    """Plain ViT with ALGM → masked-attention decoder cross-attending to the merged tokens → unmerge the mask logits.

    No adapter and no pixel decoder: the decoder reads the merged tokens (with a log-size key bias, so a merged token
    weighs as its members), predicts per-token mask logits, and only its output masks are unmerged to the patch
    grid.
    """

    def __init__(self, *, backbone: ALGMViT, decoder: nn.Module, criterion: SetCriterion, num_classes: int,
                 ignore_value: int = 255, size_divisibility: int = 16) -> None:
        super().__init__(backbone=backbone, criterion=criterion, num_classes=num_classes, ignore_value=ignore_value,
                         size_divisibility=size_divisibility)
        self.decoder = decoder

    @classmethod
    def from_config(cls, cfg) -> "MergedTokenMask2Former":  # noqa: ANN001 - a CfgNode
        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME).from_config(cfg)
        if not isinstance(backbone, ALGMViT):
            raise ValueError(f"MODEL.BACKBONE.NAME: MergedTokenMask2Former decodes ALGMViT tokens, got "
                             f"{cfg.MODEL.BACKBONE.NAME!r}")
        name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
        decoder = TRANSFORMER_DECODER_REGISTRY.get(name).from_config(cfg, in_channels=backbone.embed_dim)
        head = cfg.MODEL.SEM_SEG_HEAD
        return cls(backbone=backbone, decoder=decoder, criterion=SetCriterion.from_config(cfg),
                   num_classes=head.NUM_CLASSES, ignore_value=head.IGNORE_VALUE,
                   size_divisibility=cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY)

    def predict(self, images: Tensor) -> Dict[str, Any]:
        tokens, state = self.backbone(images)
        self._last_state = state
        with dynamic_length_attention(state.merged and self.algm.data_dependent):
            return self.decoder(tokens[:, state.num_prefix:], state)
