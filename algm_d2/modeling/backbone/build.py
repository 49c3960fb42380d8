"""Building backbones from the config: timm ViT / DeiT / EVA-01 / EVA-02 layouts and MODEL.ALGM → ALGMConfig.

Every model is built from sizes, never downloaded; released weights load afterwards (``algm_d2.checkpoint``).
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Dict

from timm.layers import trunc_normal_
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...merge import OFF, ALGMConfig
from ...merge.thresholds import read_layer_thresholds
from ...merge.config import ALGMConfigError
from ..heads.segmenter_heads import init_segmenter_weights

logger = logging.getLogger(__name__)
ARCHS = ("vit", "deit_distilled", "eva01", "eva02")

# Segmenter's ViT variants (the release's config.yml); all use MLP ratio 4 and patch 16.
SEGMENTER_VARIANTS: Dict[str, Dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


POS_EMBED_INTERPS = ("bilinear", "bicubic")
VIT_SIZE_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def check_vit_sizes(values: Dict[str, Any], keys: Dict[str, str]) -> None:
    """ValueError naming the key (``keys``: the user's name of each of VIT_SIZE_FIELDS) unless every size is a
    positive int and the width splits evenly over the heads."""
    for field in VIT_SIZE_FIELDS:
        value = values[field]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{keys[field]} must be a positive integer, got {value!r}")
    if values["embed_dim"] % values["num_heads"]:
        raise ValueError(f"{keys['embed_dim']} ({values['embed_dim']}) must be divisible by {keys['num_heads']} "
                         f"({values['num_heads']})")


def build_segmenter_vit(*, img_size: int, patch_size: int = 16, embed_dim: int, depth: int, num_heads: int,
                        mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path_rate: float = 0.0,
                        norm_eps: float = 1e-5, distilled: bool = False, class_token: bool = True,
                        final_norm: bool = True) -> VisionTransformer:
    """A timm ViT laid out like Segmenter's encoder (keys included; LayerNorm eps 1e-5, exact GELU, no head).

    ``class_token=False`` gives a ViT whose blocks see patch tokens only (SETR-MLA, SegViT: the class token is dropped
    before the blocks); ``final_norm=False`` one without the final norm (SETR and SegViT heads bring their own)."""
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    vit = cls(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
              mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0, pos_drop_rate=dropout, proj_drop_rate=dropout,
              attn_drop_rate=dropout, drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=norm_eps),
              class_token=class_token, global_pool="token" if class_token else "", final_norm=final_norm)
    # The release's init (timm's default differs only in the pos/cls init scale).
    vit.apply(init_segmenter_weights)
    trunc_normal_(vit.pos_embed, std=0.02)
    if vit.cls_token is not None:
        trunc_normal_(vit.cls_token, std=0.02)
    return vit




# ALGMConfig field -> its MODEL.ALGM key (CALIBRATION_FILE and ENABLED are read by the translator itself)
ALGM_KEYS: Dict[str, str] = {
    "local_layer": "LOCAL_LAYER", "global_layer": "GLOBAL_LAYER", "window": "WINDOW",
    "local_threshold": "LOCAL_THRESHOLD", "global_threshold": "GLOBAL_THRESHOLD", "batch_policy": "BATCH_POLICY",
    "prop_attn": "PROP_ATTN", "local_method": "LOCAL_METHOD", "tome_r": "TOME_R", "tome_layers": "TOME_LAYERS",
    "merge_value": "MERGE_VALUE", "reduce_tokens": "REDUCE_TOKENS"}


def algm_config_from_cfg(cfg) -> ALGMConfig:  # noqa: ANN001 - a CfgNode
    """MODEL.ALGM → ALGMConfig (``OFF`` unless ENABLED): the one translation of the config's ALGM keys; a bad value
    raises ValueError naming the key. Everything else reads the built model's ``algm``."""
    node = cfg.MODEL.ALGM
    if not node.ENABLED:
        return OFF
    values = {name: node[key] for name, key in ALGM_KEYS.items()}
    values["window"] = tuple(values["window"]) if isinstance(values["window"], (list, tuple)) else values["window"]
    values["tome_layers"] = tuple(values["tome_layers"])
    sources = {stage: f"MODEL.ALGM.{ALGM_KEYS[stage + '_threshold']}" for stage in ("local", "global")}
    if node.CALIBRATION_FILE:
        calibrated = calibrated_thresholds(node.CALIBRATION_FILE, values)
        values.update(calibrated)
        sources.update({name.split("_")[0]: f"calibrated, {node.CALIBRATION_FILE}" for name in calibrated})
    try:
        algm = ALGMConfig(**values)
    except ALGMConfigError as err:
        raise ValueError(f"MODEL.ALGM.{ALGM_KEYS[err.field]}: {err}") from None
    for stage in ("local", "global"):
        rule = getattr(algm, f"{stage}_threshold")
        if getattr(algm, f"{stage}_active") and isinstance(rule, float) and rule >= 1.0:
            logger.warning("%s = %s >= 1: no cosine similarity reaches it, so this stage merges nothing (switch a "
                           "stage off with null instead)", sources[stage], rule)
    logger.info("ALGM thresholds: %s; batch policy %s", "; ".join(
        f"{name} after layer {getattr(algm, stage + '_layer')}: {getattr(algm, stage + '_threshold')} "
        f"({sources[stage]})" if getattr(algm, f"{stage}_active") else f"{name} off"
        for stage, name in (("local", "CLAP"), ("global", "GBM"))), algm.batch_policy)
    return algm


def calibrated_thresholds(path: str, values: Dict[str, Any]) -> Dict[str, float]:
    """τ = μ + σ from a calibration JSON for each stage whose rule is a float; rules given as strings are kept."""
    try:
        layers = read_layer_thresholds(path)
    except ValueError as err:
        raise ValueError(f"MODEL.ALGM.CALIBRATION_FILE: {err}") from None
    updates = {}
    for stage in ("local", "global"):
        layer, rule = values[f"{stage}_layer"], values[f"{stage}_threshold"]
        if layer is None or not isinstance(rule, (int, float)) or isinstance(rule, bool):
            continue
        if layer not in layers:
            raise ValueError(f"MODEL.ALGM.CALIBRATION_FILE: {path} has no threshold for layer {layer} "
                             f"(it has layers {sorted(layers)})")
        threshold = layers[layer]
        if threshold >= 1.0:
            raise ValueError(f"MODEL.ALGM.CALIBRATION_FILE: {path} gives layer {layer} the threshold {threshold:.4f} "
                             "(mean + std of its token similarities) >= 1, above every cosine similarity: that stage "
                             "would merge nothing. Calibrate a trained model (MODEL.WEIGHTS), or set "
                             f"MODEL.ALGM.{stage.upper()}_THRESHOLD yourself and drop MODEL.ALGM.CALIBRATION_FILE")
        updates[f"{stage}_threshold"] = threshold
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


def build_timm_vit(cfg, *, class_token: bool = True, final_norm: bool = True) -> nn.Module:  # noqa: ANN001
    """The timm encoder MODEL.BACKBONE describes (ARCH one of ``ARCHS``); ``class_token``/``final_norm`` as
    :func:`build_segmenter_vit` (ARCH "vit" only)."""
    node = cfg.MODEL.BACKBONE
    if node.ARCH not in ARCHS:
        raise ValueError(f"MODEL.BACKBONE.ARCH must be one of {ARCHS}, got {node.ARCH!r}")
    check_vit_sizes({field: node[field.upper()] for field in VIT_SIZE_FIELDS},
                    {field: f"MODEL.BACKBONE.{field.upper()}" for field in VIT_SIZE_FIELDS})
    sizes = dict(img_size=node.IMG_SIZE, patch_size=node.PATCH_SIZE, embed_dim=node.EMBED_DIM, depth=node.DEPTH,
                 num_heads=node.NUM_HEADS, mlp_ratio=node.MLP_RATIO, drop_path_rate=node.DROP_PATH_RATE,
                 norm_eps=node.NORM_EPS)
    if not (class_token and final_norm) and node.ARCH != "vit":
        raise ValueError(f"MODEL.BACKBONE.ARCH: this network needs a plain ViT (\"vit\"), got {node.ARCH!r}")
    if node.ARCH.startswith("eva"):
        return build_eva(**sizes, eva02=node.ARCH == "eva02", rope_pretrain_grid=node.ROPE_PRETRAIN_GRID)
    return build_segmenter_vit(**sizes, dropout=node.DROPOUT, distilled=node.ARCH == "deit_distilled",
                               class_token=class_token, final_norm=final_norm)
