"""SETR (Zheng et al., CVPR 2021) with ALGM: plain ViT → CNN head on the unmerged grid of tapped layers.

``forward(images)`` maps normalized images ``[B, 3, H, W]`` to class logits ``[B, K, H, W]`` (pad to the patch size,
encode up to the deepest tap, head, bilinear resize to the padded size, crop), as the release's ``EncoderDecoder``.
Naive and PUP read one layer (``in_index``, the last block); MLA reads four (``mla_index``) through its neck. The
auxiliary heads of the release's training (loss weight 0.4) read further layers (naive/PUP) or the neck's levels
(MLA); they run in training only. Module names follow the release (``backbone``, ``decode_head``,
``auxiliary_head.i``; the MLA neck, in the release's backbone, is ``neck``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone.algm_vit import ALGMViT
from ..backbone.build import build_timm_vit
from ..heads.setr_heads import SETRMLAHead, SETRMLANeck
from ..ops.upsample_argmax import upsample_argmax, upsample_bilinear
from ..registry import META_ARCH_REGISTRY, SEM_SEG_HEAD_REGISTRY
from .tapped import TappedViTNet


@META_ARCH_REGISTRY.register()
class SETR(TappedViTNet):
    """ViT (no final norm) with ALGM + a SETR head; ``losses`` adds the auxiliary heads' cross-entropies.

    Args:
        backbone: the ALGM encoder; with a neck, a ViT without class token (the release drops it before the blocks).
        decode_head: :class:`SETRUpHead` (reads ``in_index``) or :class:`SETRMLAHead` (reads the neck).
        in_index: the block the up head reads (0-based; negative counts from the end).
        neck: :class:`SETRMLANeck` for MLA (reads ``mla_index``), else None.
        auxiliary_heads: heads for the training loss; ``aux_in_index[i]`` is the block head i reads (no neck) or
            the neck level (with a neck).
        aux_loss_weight: weight of each auxiliary cross-entropy (the release: 0.4).
    """

    def __init__(self, *, backbone: ALGMViT, decode_head: nn.Module, num_classes: int, in_index: int = -1,
                 neck: Optional[SETRMLANeck] = None, mla_index: Sequence[int] = (5, 11, 17, 23),
                 auxiliary_heads: Sequence[nn.Module] = (), aux_in_index: Sequence[int] = (),
                 aux_loss_weight: float = 0.4, ignore_value: int = 255) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, ignore_value=ignore_value)
        if (neck is None) == isinstance(decode_head, SETRMLAHead):
            raise ValueError("SETR: the MLA head needs the MLA neck and the up head none")
        if len(auxiliary_heads) != len(aux_in_index):
            raise ValueError(f"MODEL.SETR.AUX_IN_INDEX has {len(aux_in_index)} entries for {len(auxiliary_heads)} "
                             "auxiliary heads")
        self.decode_head = decode_head
        self.neck = neck
        self.auxiliary_head = nn.ModuleList(auxiliary_heads)
        self.aux_loss_weight = aux_loss_weight
        if neck is None:
            self.in_index = self.resolve_taps([in_index], "MODEL.SETR.IN_INDEX")[0]
            self.aux_in_index = self.resolve_taps(aux_in_index, "MODEL.SETR.AUX_IN_INDEX")
        else:
            self.mla_index = self.resolve_taps(mla_index, "MODEL.SETR.MLA_INDEX")
            if len(self.mla_index) != 4:
                raise ValueError(f"MODEL.SETR.MLA_INDEX must name 4 blocks, got {tuple(mla_index)}")
            bad = [i for i in aux_in_index if not 0 <= i < 4]
            if bad:
                raise ValueError(f"MODEL.SETR.AUX_IN_INDEX: with MLA these are neck levels 0..3, got {bad}")
            self.aux_in_index = tuple(int(i) for i in aux_in_index)

    @classmethod
    def from_config(cls, cfg) -> "SETR":  # noqa: ANN001 - a CfgNode
        node, head = cfg.MODEL.SETR, cfg.MODEL.SEM_SEG_HEAD
        if cfg.MODEL.BACKBONE.NAME != "ALGMViT":
            raise ValueError(f"MODEL.BACKBONE.NAME: SETR reads the tokens of ALGMViT, got {cfg.MODEL.BACKBONE.NAME!r}")
        mla = head.NAME == "SETRMLAHead"
        backbone = ALGMViT.from_config(cfg, vit=build_timm_vit(cfg, class_token=not mla, final_norm=False))
        head_cls = SEM_SEG_HEAD_REGISTRY.get(head.NAME)
        dim = backbone.embed_dim
        auxiliary = [head_cls.from_config(cfg, dim, auxiliary=True) for _ in node.AUX_IN_INDEX]
        neck = SETRMLANeck(embed_dim=dim, mla_channels=node.MLA_CHANNELS,
                           norm_eps=cfg.MODEL.BACKBONE.NORM_EPS) if mla else None
        return cls(backbone=backbone, decode_head=head_cls.from_config(cfg, dim), num_classes=head.NUM_CLASSES,
                   in_index=node.IN_INDEX, neck=neck, mla_index=node.MLA_INDEX, auxiliary_heads=auxiliary,
                   aux_in_index=node.AUX_IN_INDEX, aux_loss_weight=node.AUX_LOSS_WEIGHT,
                   ignore_value=head.IGNORE_VALUE)

    def _head_logits(self, padded: Tensor, with_auxiliary: bool) -> List[Tensor]:
        """Logits of the decode head (first) and, if asked, the auxiliary heads, each before the final resize."""
        aux = list(zip(self.auxiliary_head, self.aux_in_index)) if with_auxiliary else []
        if self.neck is None:
            taps = self.encode(padded, [self.in_index] + [index for _, index in aux])
            return [self.decode_head(taps[self.in_index])] + [head(taps[index]) for head, index in aux]
        taps = self.encode(padded, self.mla_index)
        levels = self.neck([taps[index] for index in self.mla_index])
        return [self.decode_head(levels)] + [head(levels[index]) for head, index in aux]

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        padded = self.pad(images)
        logits = upsample_bilinear(self._head_logits(padded, False)[0], tuple(padded.shape[-2:]))
        return logits[..., :height, :width]

    def predict_labels(self, images: Tensor) -> Tensor:
        """``forward(images).argmax(1)`` ``[B, H, W]`` without the full-resolution logits (fused resize + argmax)."""
        height, width = images.shape[-2:]
        padded = self.pad(images)
        labels = upsample_argmax(self._head_logits(padded, False)[0], tuple(padded.shape[-2:]))
        return labels[:, :height, :width]

    def losses(self, images: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """Cross-entropy of the decode head (``loss_sem_seg``) and ``aux_loss_weight`` × that of each auxiliary head
        (``loss_aux_i``), on labels ``[B, H, W]`` (``ignore_value`` ignored)."""
        padded = self.pad(images)
        size = tuple(padded.shape[-2:])
        targets = self.pad_targets(targets, size)
        losses = {}
        for i, logits in enumerate(self._head_logits(padded, self.training)):
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_value)
            losses["loss_sem_seg" if i == 0 else f"loss_aux_{i - 1}"] = loss if i == 0 else self.aux_loss_weight * loss
        return losses
