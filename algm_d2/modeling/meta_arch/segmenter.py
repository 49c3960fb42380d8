"""Segmenter (Strudel et al., ICCV 2021) with ALGM: ViT encoder → decoder on merged tokens → unmerge → upsample.

``forward(images)`` takes normalized images ``[B, 3, H, W]`` and returns class logits ``[B, K, H, W]`` exactly like
the release's forward: pad bottom/right to a multiple of the patch size, encode, decode, bilinear upsample to the
padded size, crop the padding. Module names (``encoder.*``, ``decoder.*``) are the release's.
"""
from __future__ import annotations

import json
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ...merge import OFF, ALGMConfig, MergeState
from ..backbone.algm_vit import ALGMViT
from ..heads.segmenter_heads import LinearDecoder, MaskTransformer, init_segmenter_weights
from ..registry import META_ARCH_REGISTRY, SEM_SEG_HEAD_REGISTRY

# Segmenter's ViT variants (the release's config.yml); all use MLP ratio 4 and patch 16.
SEGMENTER_VARIANTS: Dict[str, Dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def build_segmenter_vit(*, img_size: int, patch_size: int = 16, embed_dim: int, depth: int, num_heads: int,
                        mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path_rate: float = 0.0,
                        norm_eps: float = 1e-5, distilled: bool = False) -> VisionTransformer:
    """A timm ViT laid out like Segmenter's encoder (keys included; LayerNorm eps 1e-5, exact GELU, no head)."""
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    vit = cls(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0, pos_drop_rate=dropout, proj_drop_rate=dropout,
              attn_drop_rate=dropout, drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=norm_eps))
    # The release's init (timm's default differs only in the pos/cls init scale).
    vit.apply(init_segmenter_weights)
    trunc_normal_(vit.pos_embed, std=0.02)
    trunc_normal_(vit.cls_token, std=0.02)
    return vit


def pad_to_multiple(images: Tensor, multiple: int, value: float = 0.0) -> Tensor:
    """Pad bottom/right so H and W are multiples of ``multiple`` (the release's ``padding``)."""
    pad_h, pad_w = -images.shape[-2] % multiple, -images.shape[-1] % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=value)
    return images


@META_ARCH_REGISTRY.register()
class Segmenter(nn.Module):
    """ViT encoder with ALGM + Segmenter decoder. After a forward, :attr:`merge_stats` describes the merges.

    Args:
        encoder: the ALGM backbone (its ``algm`` config decides the merging).
        decoder: ``MaskTransformer`` or ``LinearDecoder`` (runs on merged tokens and unmerges its outputs).
        num_classes: number of classes K.
        normalization: the pixel normalization the weights expect, {"mean": (...), "std": (...)} on [0, 1] RGB
            images; informational (callers normalize, as with the release).
    """

    def __init__(self, *, encoder: ALGMViT, decoder: nn.Module, num_classes: int,
                 normalization: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.patch_size = encoder.patch_size[0]
        self.normalization = normalization
        self._last_state: Optional[MergeState] = None

    @classmethod
    def from_config(cls, cfg) -> "Segmenter":  # noqa: ANN001 - a CfgNode
        backbone = cfg.MODEL.BACKBONE
        vit = build_segmenter_vit(
            img_size=backbone.IMG_SIZE, patch_size=backbone.PATCH_SIZE, embed_dim=backbone.EMBED_DIM,
            depth=backbone.DEPTH, num_heads=backbone.NUM_HEADS, mlp_ratio=backbone.MLP_RATIO,
            dropout=backbone.DROPOUT, drop_path_rate=backbone.DROP_PATH_RATE, norm_eps=backbone.NORM_EPS,
            distilled=backbone.ARCH == "deit_distilled",
        )
        encoder = ALGMViT(vit=vit, algm=algm_config_from_cfg(cfg), pos_embed_interp=backbone.POS_EMBED_INTERP,
                          activation_checkpointing=backbone.ACTIVATION_CHECKPOINTING)
        decoder = SEM_SEG_HEAD_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME).from_config(cfg, encoder_dim=encoder.embed_dim)
        return cls(encoder=encoder, decoder=decoder, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    @property
    def algm(self) -> ALGMConfig:
        return self.encoder.algm

    def set_algm(self, config: ALGMConfig) -> None:
        """Switch merging (e.g. train with one threshold, evaluate with a lower τ as ALGM*)."""
        config.check_depth(self.encoder.depth)
        self.encoder.algm = config
        if isinstance(self.decoder, MaskTransformer):
            self.decoder.prop_attn = config.prop_attn

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        images = pad_to_multiple(images, self.patch_size)
        tokens, state = self.encoder(images)
        self._last_state = state
        masks = self.decoder(tokens[:, state.num_prefix:], state)
        masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return masks[..., :height, :width]

    @property
    def merge_stats(self) -> Dict[str, Any]:
        """Of the last forward: ``tokens_per_layer`` (per block, per image, class token included),
        ``initial_tokens`` (entering block 1) and ``num_prefix``."""
        state = self._last_state
        if state is None:
            return {"tokens_per_layer": [], "initial_tokens": 0, "num_prefix": 0}
        h, w = state.grid_size
        return {"tokens_per_layer": state.tokens_per_layer(), "initial_tokens": state.num_prefix + h * w,
                "num_prefix": state.num_prefix}


def algm_config_from_cfg(cfg) -> ALGMConfig:  # noqa: ANN001 - a CfgNode
    """MODEL.ALGM → ALGMConfig (``OFF`` unless ENABLED); a bad value raises ValueError naming the key."""
    node = cfg.MODEL.ALGM
    if not node.ENABLED:
        return OFF
    fields = {"local_layer": "LOCAL_LAYER", "global_layer": "GLOBAL_LAYER", "window": "WINDOW",
              "local_threshold": "LOCAL_THRESHOLD", "global_threshold": "GLOBAL_THRESHOLD",
              "batch_policy": "BATCH_POLICY", "prop_attn": "PROP_ATTN"}
    values = {name: node[key] for name, key in fields.items()}
    values["window"] = tuple(values["window"])
    if node.CALIBRATION_FILE:
        values.update(calibrated_thresholds(node.CALIBRATION_FILE, values))
    try:
        return ALGMConfig(**values)
    except ValueError as err:
        field = str(err).split(" ")[0].rstrip(":")
        key = fields.get(field)
        raise ValueError(f"MODEL.ALGM.{key}: {err}" if key else f"MODEL.ALGM: {err}") from None


def calibrated_thresholds(path: str, values: Dict[str, Any]) -> Dict[str, float]:
    """τ = μ + σ from a calibration JSON for each stage whose rule is a float; rules given as strings are kept."""
    try:
        with open(path) as f:
            layers = json.load(f)["layers"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"MODEL.ALGM.CALIBRATION_FILE: cannot read per-layer thresholds from {path}: {err}") from None
    updates = {}
    for stage in ("local", "global"):
        layer, rule = values[f"{stage}_layer"], values[f"{stage}_threshold"]
        if layer is None or not isinstance(rule, (int, float)) or isinstance(rule, bool):
            continue
        if str(layer) not in layers:
            raise ValueError(f"MODEL.ALGM.CALIBRATION_FILE: {path} has no threshold for layer {layer} "
                             f"(it has layers {sorted(layers)})")
        updates[f"{stage}_threshold"] = float(layers[str(layer)]["threshold"])
    return updates
