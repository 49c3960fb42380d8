"""SegViT (Zhang et al., NeurIPS 2022) with ALGM: plain ViT → ATM decoder on the merged tokens of tapped layers.

``forward(images)`` maps normalized images ``[B, 3, H, W]`` to per-class scores ``[B, K, H, W]`` in the release's
order: the summed mask logits are resized to the (padded) input first, then ``softmax(class)`` without "no object"
× ``sigmoid(mask)`` (already probability-like, so the segmentor averages them without a softmax). The ViT's blocks
see patch tokens only (the release's ``with_cls_token=False``) and it has no final norm. Module names are the
release's ``backbone.*`` (after the key conversion of :mod:`algm_d2.checkpoint.released`) and ``decode_head.*``.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch.nn.functional as F
from torch import Tensor

from ..backbone.algm_vit import ALGMViT
from ..backbone.build import build_timm_vit
from ..heads.atm_head import ATMHead, ATMLoss
from ..mask2former import semantic_inference, semantic_to_instance_targets
from ..registry import META_ARCH_REGISTRY, SEM_SEG_HEAD_REGISTRY
from .tapped import TappedViTNet


@META_ARCH_REGISTRY.register()
class SegViT(TappedViTNet):
    """ViT with ALGM + ATM decoder reading the blocks ``out_indices`` (0-based, shallowest first)."""

    output_kind = "probabilities"

    def __init__(self, *, backbone: ALGMViT, decode_head: ATMHead, criterion: ATMLoss, num_classes: int,
                 out_indices: Sequence[int] = (7, 15, 23), ignore_value: int = 255) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, ignore_value=ignore_value)
        self.out_indices = self.resolve_taps(out_indices, "MODEL.SEGVIT.OUT_INDICES")
        if list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f"MODEL.SEGVIT.OUT_INDICES must be increasing, got {tuple(out_indices)}")
        if len(self.out_indices) != decode_head.num_stages:
            raise ValueError(f"MODEL.SEGVIT.OUT_INDICES names {len(self.out_indices)} blocks for "
                             f"{decode_head.num_stages} ATM decoders")
        self.decode_head = decode_head
        self.criterion = criterion  # no weights: its buffer is non-persistent

    @classmethod
    def from_config(cls, cfg) -> "SegViT":  # noqa: ANN001 - a CfgNode
        if cfg.MODEL.BACKBONE.NAME != "ALGMViT":
            raise ValueError(f"MODEL.BACKBONE.NAME: SegViT reads the tokens of ALGMViT, got "
                             f"{cfg.MODEL.BACKBONE.NAME!r}")
        backbone = ALGMViT.from_config(cfg, vit=build_timm_vit(cfg, class_token=False, final_norm=False))
        head = cfg.MODEL.SEM_SEG_HEAD
        decode_head = SEM_SEG_HEAD_REGISTRY.get(head.NAME).from_config(cfg, in_channels=backbone.embed_dim)
        return cls(backbone=backbone, decode_head=decode_head, criterion=ATMLoss.from_config(cfg),
                   num_classes=head.NUM_CLASSES, out_indices=cfg.MODEL.SEGVIT.OUT_INDICES,
                   ignore_value=head.IGNORE_VALUE)

    def predict(self, padded: Tensor) -> Dict[str, Any]:
        """Padded images → ``{"pred_logits", "pred_masks" (patch grid), "aux_outputs"}``."""
        taps = self.encode(padded, self.out_indices)
        return self.decode_head([taps[i] for i in self.out_indices], prop_attn=self.algm.prop_attn)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        padded = self.pad(images)
        outputs = self.predict(padded)
        masks = F.interpolate(outputs["pred_masks"], size=tuple(padded.shape[-2:]), mode="bilinear",
                              align_corners=False)
        return semantic_inference(outputs["pred_logits"], masks)[..., :height, :width]

    def predict_labels(self, images: Tensor) -> Tensor:
        """``forward(images).argmax(1)`` ``[B, H, W]`` (the benchmark's ``--output labels``)."""
        return self.forward(images).argmax(1)

    def losses(self, images: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """ATM losses for ``images`` and semantic labels ``targets [B, H, W]`` (``ignore_value`` ignored)."""
        padded = self.pad(images)
        targets = self.pad_targets(targets, tuple(padded.shape[-2:]))
        instances = [semantic_to_instance_targets(t, self.ignore_value) for t in targets]
        return self.criterion(self.predict(padded), instances)
