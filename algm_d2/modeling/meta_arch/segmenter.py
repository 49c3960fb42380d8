"""Segmenter (Strudel et al., ICCV 2021) with ALGM: ViT encoder → decoder on merged tokens → unmerge → upsample.

``forward(images)`` takes normalized images ``[B, 3, H, W]`` and returns class logits ``[B, K, H, W]`` exactly like
the release's forward: pad bottom/right to a multiple of the patch size, encode, decode, bilinear upsample to the
padded size, crop the padding. Module names are the release's (``decoder.*``; its ``encoder.*`` is our ``backbone.*``:
the release's state dicts load as they are).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ...merge import MergeState
from ..backbone.algm_vit import ALGMViT
from ..ops.attention_kernels import dynamic_length_attention
from ..inputs import check_image_batch
from ..ops.upsample_argmax import upsample_argmax, upsample_bilinear
from ..registry import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEAD_REGISTRY
from .merging import MergingNetwork

def pad_to_multiple(images: Tensor, multiple: int, value: float = 0.0) -> Tensor:
    """Pad bottom/right so H and W are multiples of ``multiple`` (the release's ``padding``)."""
    pad_h, pad_w = -images.shape[-2] % multiple, -images.shape[-1] % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=value)
    return images


# the release's name of Segmenter's ViT in state dicts (``encoder.*``; ours: ``backbone.*``), at the top level or
# under SegmentationModel's ``net.``
_OWN, _RELEASE = "backbone.", "encoder."


def release_key(key: str, prefix: str = "") -> str:
    """Our key ``prefix + backbone.…`` (or ``prefix + net.backbone.…``) under the release's name; others as they are."""
    for outer in (prefix, prefix + "net."):
        if key.startswith(outer + _OWN):
            return outer + _RELEASE + key[len(outer + _OWN):]
    return key


def own_key(key: str, prefix: str = "") -> str:
    """The inverse of :func:`release_key`."""
    for outer in (prefix, prefix + "net."):
        if key.startswith(outer + _RELEASE):
            return outer + _OWN + key[len(outer + _RELEASE):]
    return key


def _release_key_names(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Keys in the release's layout (``encoder.*``) name the backbone (``backbone.*``)."""
    for key in [k for k in state_dict if k.startswith(prefix + _RELEASE)]:
        state_dict[own_key(key, prefix)] = state_dict.pop(key)


@META_ARCH_REGISTRY.register()
class Segmenter(MergingNetwork, nn.Module):
    """ViT encoder with ALGM + Segmenter decoder. After a forward, :attr:`merge_stats` describes the merges.

    Args:
        backbone: the ALGM ViT (its ``algm`` config decides the merging); the release calls it ``encoder``, and
            state dicts in the release's layout (``encoder.*``) load as they are.
        decoder: ``MaskTransformer`` or ``LinearDecoder`` (runs on merged tokens and unmerges its outputs).
        num_classes: number of classes K.
        normalization: the pixel normalization the weights expect, {"mean": (...), "std": (...)} on [0, 1] RGB
            images; informational (callers normalize, as with the release).
    """

    def __init__(self, *, backbone: ALGMViT, decoder: nn.Module, num_classes: int,
                 normalization: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.num_classes = num_classes
        self.patch_size = backbone.patch_size[0]
        self.normalization = normalization
        self._last_state: Optional[MergeState] = None
        self.register_load_state_dict_pre_hook(_release_key_names)

    @classmethod
    def from_config(cls, cfg) -> "Segmenter":  # noqa: ANN001 - a CfgNode
        backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME).from_config(cfg)
        if not isinstance(backbone, ALGMViT):
            raise ValueError(f"MODEL.BACKBONE.NAME: Segmenter decodes the tokens of ALGMViT, got "
                             f"{cfg.MODEL.BACKBONE.NAME!r}")
        decoder = SEM_SEG_HEAD_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME).from_config(cfg, encoder_dim=backbone.embed_dim)
        return cls(backbone=backbone, decoder=decoder, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    def _patch_logits(self, padded: Tensor) -> Tensor:
        tokens, state = self.backbone(padded)
        self._last_state = state
        with dynamic_length_attention(state.merged and self.algm.data_dependent):
            return self.decoder(tokens[:, state.num_prefix:], state, prop_attn=self.algm.prop_attn)

    def forward(self, images: Tensor) -> Tensor:
        check_image_batch(images)
        height, width = images.shape[-2:]
        images = pad_to_multiple(images, self.patch_size)
        masks = upsample_bilinear(self._patch_logits(images), tuple(images.shape[-2:]))  # = F.interpolate
        return masks[..., :height, :width]

    def predict_labels(self, images: Tensor) -> Tensor:
        """``forward(images).argmax(1)`` ``[B, H, W]`` without materialising the full-resolution logits (fused
        upsample + argmax: the evaluation's decode tail at its memory floor)."""
        check_image_batch(images)
        height, width = images.shape[-2:]
        images = pad_to_multiple(images, self.patch_size)
        labels = upsample_argmax(self._patch_logits(images), tuple(images.shape[-2:]))
        return labels[:, :height, :width]
