"""Key layouts of the SETR and SegViT releases (mmseg 0.x ``EncoderDecoder`` checkpoints) → our module names.

- SETR (fudan-zvg/SETR): the backbone's keys are timm's already (``backbone.blocks.i.attn.qkv``, ...). The MLA neck
  lives in the release's backbone (``backbone.mla.*``, ``backbone.norm_0..3``): renamed to ``neck.*``. The MLA ViT
  drops its class token before the blocks: ``backbone.cls_token`` and the class token's position embedding are
  dropped. Every head's ``conv_seg`` (mmseg's unused default classifier) is dropped.
- SegViT (zbwxp/SegVit): mmseg's ``VisionTransformer`` names (``backbone.layers.i.ln1``, ``attn.attn.in_proj_*``,
  ``ffn.layers.0.0``, ``patch_embed.projection``; the inverse of the release's ``vit2mmseg`` converter) → timm's;
  class token and its position dropped (``with_cls_token=False``); the loss's ``empty_weight`` buffer dropped.

Everything dropped is logged; the converted dict then goes through the strict key/shape check.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Dict, List, Mapping, Tuple

from torch import Tensor, nn

from ..modeling.meta_arch.segvit import SegViT
from ..modeling.meta_arch.setr import SETR

logger = logging.getLogger(__name__)

# mmseg VisionTransformer → timm VisionTransformer, applied in order to keys under "backbone.".
_MMSEG_VIT_RENAMES = (
    (re.compile(r"^layers\.(\d+)\.ln(1|2)\."), r"blocks.\1.norm\2."),
    (re.compile(r"^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$"), r"blocks.\1.attn.qkv.\2"),
    (re.compile(r"^layers\.(\d+)\.attn\.attn\.out_proj\."), r"blocks.\1.attn.proj."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.0\.0\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.1\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^patch_embed\.projection\."), r"patch_embed.proj."),
)


def _drop_class_token(state_dict: Dict[str, Tensor], backbone: nn.Module, dropped: List[str]) -> None:
    """The release keeps a class token (and its position) that never reaches the blocks: drop both."""
    if getattr(backbone, "cls_token", None) is not None or "backbone.cls_token" not in state_dict:
        return
    state_dict.pop("backbone.cls_token")
    dropped.append("backbone.cls_token")
    pos = state_dict.get("backbone.pos_embed")
    if pos is not None and pos.shape[1] == backbone.pos_embed.shape[1] + 1:
        state_dict["backbone.pos_embed"] = pos[:, 1:]
        dropped.append("backbone.pos_embed[:, 0] (the class token's position)")


def convert_setr(state_dict: Mapping[str, Tensor], net: SETR) -> Tuple[Dict[str, Tensor], List[str]]:
    """A SETR release state dict (or one of ours: unchanged) → our keys; returns (converted, dropped)."""
    out: Dict[str, Tensor] = {}
    dropped: List[str] = []
    for key, value in state_dict.items():
        if re.match(r"^(decode_head|auxiliary_head\.\d+)\.conv_seg\.", key):
            dropped.append(key)
            continue
        if net.neck is not None and re.match(r"^backbone\.(mla|norm_\d)\.", key):
            key = "neck." + key[len("backbone."):]
        out[key] = value
    _drop_class_token(out, net.backbone, dropped)
    return out, dropped


def convert_segvit(state_dict: Mapping[str, Tensor], net: SegViT) -> Tuple[Dict[str, Tensor], List[str]]:
    """A SegViT release state dict (or one of ours: unchanged) → our keys; returns (converted, dropped)."""
    out: Dict[str, Tensor] = {}
    dropped: List[str] = []
    for key, value in state_dict.items():
        if key.startswith("decode_head.loss_decode."):
            dropped.append(key)
            continue
        if key.startswith("backbone."):
            name = key[len("backbone."):]
            for pattern, replacement in _MMSEG_VIT_RENAMES:
                name = pattern.sub(replacement, name)
            key = "backbone." + name
        out[key] = value
    _drop_class_token(out, net.backbone, dropped)
    return out, dropped


# Network type → converter of its release's layout (identity on our own layout).
RELEASE_CONVERTERS: Dict[type, Callable[[Mapping[str, Tensor], nn.Module], Tuple[Dict[str, Tensor], List[str]]]] = {
    SETR: convert_setr,
    SegViT: convert_segvit,
}


def convert_released(net: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> Dict[str, Tensor]:
    """``state_dict`` in ``net``'s release layout → ``net``'s keys (unchanged for networks without a converter)."""
    convert = RELEASE_CONVERTERS.get(type(net))
    if convert is None:
        return dict(state_dict)
    converted, dropped = convert(state_dict, net)
    if dropped:
        logger.info("%s: dropping %d entries not used by %s: %s", source, len(dropped), type(net).__name__,
                    ", ".join(dropped))
    return converted

