"""Building backbones from the config: timm ViT / DeiT / EVA-01 / EVA-02 layouts and MODEL.ALGM → ALGMConfig.

Every model is built from sizes, never downloaded; released weights load afterwards (``algm_d2.checkpoint``).
"""
from __future__ import annotations

import json
from functools import partial
from typing import Any, Dict

from timm.layers import trunc_normal_
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...merge import OFF, ALGMConfig
from ..heads.segmenter_heads import init_segmenter_weights

ARCHS = ("vit", "deit_distilled", "eva01", "eva02")

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




def algm_config_from_cfg(cfg) -> ALGMConfig:  # noqa: ANN001 - a CfgNode
    """MODEL.ALGM → ALGMConfig (``OFF`` unless ENABLED); a bad value raises ValueError naming the key."""
    node = cfg.MODEL.ALGM
    if not node.ENABLED:
        return OFF
    fields = {"local_layer": "LOCAL_LAYER", "global_layer": "GLOBAL_LAYER", "window": "WINDOW",
              "local_threshold": "LOCAL_THRESHOLD", "global_threshold": "GLOBAL_THRESHOLD",
              "batch_policy": "BATCH_POLICY", "prop_attn": "PROP_ATTN", "local_method": "LOCAL_METHOD",
              "tome_r": "TOME_R", "tome_layers": "TOME_LAYERS", "merge_value": "MERGE_VALUE",
              "reduce_tokens": "REDUCE_TOKENS"}
    values = {name: node[key] for name, key in fields.items()}
    values["window"] = tuple(values["window"])
    values["tome_layers"] = tuple(values["tome_layers"])
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


def build_eva(*, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
              drop_path_rate: float = 0.0, norm_eps: float = 1e-6, eva02: bool = False, rope_pretrain_grid: int = 16
              ) -> Eva:
    """A timm Eva with the state_dict layout of EVA-01 (fused qkv with q/v bias, GELU MLP, absolute positions; e.g.
    ViT-g: 1408 wide, 40 blocks, 16 heads, MLP 6144) or timm's EVA-02 B/L (SwiGLU with sub-LN, 2-D RoPE whose
    frequencies are laid out for ``rope_pretrain_grid``² patches and interpolated to the input grid; timm's filter
    converts the original release's separate q/k/v into the fused qkv)."""
    common = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0, drop_path_rate=drop_path_rate,
                  norm_layer=partial(nn.LayerNorm, eps=norm_eps), use_abs_pos_emb=True,
                  use_fc_norm=False)  # a final per-token norm (as timm's forward_features), no pooling norm
    if eva02:
        return Eva(**common, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                   ref_feat_shape=(rope_pretrain_grid, rope_pretrain_grid), dynamic_img_size=True)
    return Eva(**common, use_rot_pos_emb=False)


def build_timm_vit(cfg) -> nn.Module:  # noqa: ANN001 - a CfgNode
    """The timm encoder MODEL.BACKBONE describes (ARCH one of ``ARCHS``)."""
    node = cfg.MODEL.BACKBONE
    if node.ARCH not in ARCHS:
        raise ValueError(f"MODEL.BACKBONE.ARCH must be one of {ARCHS}, got {node.ARCH!r}")
    sizes = dict(img_size=node.IMG_SIZE, patch_size=node.PATCH_SIZE, embed_dim=node.EMBED_DIM, depth=node.DEPTH,
                 num_heads=node.NUM_HEADS, mlp_ratio=node.MLP_RATIO, drop_path_rate=node.DROP_PATH_RATE,
                 norm_eps=node.NORM_EPS)
    if node.ARCH.startswith("eva"):
        return build_eva(**sizes, eva02=node.ARCH == "eva02", rope_pretrain_grid=node.ROPE_PRETRAIN_GRID)
    return build_segmenter_vit(**sizes, dropout=node.DROPOUT, distilled=node.ARCH == "deit_distilled")
