"""Backbone initialisation from timm / EVA weight files (ImageNet or MIM pretraining) before fine-tuning.

Only the ViT part of the backbone is loaded (for ViT-Adapter, the adapter stays newly initialised). timm's own
checkpoint filters convert the original EVA/EVA-02/DeiT layouts and resize the position embedding and the patch
kernel to the model; every ViT key must then be present with its shape, and keys the segmentation model has no use
for (classifier, final/pooling norm, MIM heads) are dropped and logged.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Union

import torch
from timm.models import eva, vision_transformer

from ..modeling.backbone.algm_vit import ALGMViT
from .safe_load import UnreadableCheckpointError
from .segmenter import raise_on_mismatch, read_state_dict

logger = logging.getLogger(__name__)

# Pretraining-only parts: classification heads, the final/pooling norms (segmentation heads bring their own), MIM heads.
PRETRAIN_ONLY_PREFIXES = ("head.", "head_dist.", "fc_norm.", "norm.", "lm_head.", "mask_token", "rel_pos_bias.")
# Files of average-pooled classifiers have no final per-token norm: the model's then keeps its init (with a warning).
OPTIONAL_PREFIXES = ("norm.",)


def read_pretrained(path: Union[str, Path], *, weights_only: bool = True) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch file (``model``/``state_dict``/``module``/``model_ema`` unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path}")
        from safetensors import SafetensorError  # noqa: PLC0415 - only for this format
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UnreadableCheckpointError(f"MODEL.BACKBONE.PRETRAINED {path} ({path.stat().st_size} bytes) is "
                                            f"truncated or not a safetensors file: {err}") from None
    return read_state_dict(path, weights_only=weights_only)


def drop_unused_class_token(state_dict: Dict[str, torch.Tensor], backbone: ALGMViT, source: str
                            ) -> Dict[str, torch.Tensor]:
    """For a ViT whose blocks see patch tokens only (SETR-MLA, SegViT; their releases drop the class token before the
    blocks): drop the file's ``cls_token`` and the class token's entry of a ``pos_embed`` laid out as 1 + side²."""
    if backbone.cls_token is not None or "cls_token" not in state_dict:
        return state_dict
    state_dict = {k: v for k, v in state_dict.items() if k != "cls_token"}
    pos = state_dict.get("pos_embed")
    grid = 0 if pos is None else pos.shape[1] - 1
    if grid > 0 and math.isqrt(grid) ** 2 == grid:
        state_dict["pos_embed"] = pos[:, 1:]
    logger.info("%s: the backbone has no class token: dropping cls_token and its position embedding", source)
    return state_dict


def load_pretrained_vit(backbone: ALGMViT, path: Union[str, Path], *, weights_only: bool = True) -> None:
    """Initialise ``backbone``'s ViT from a timm/EVA weight file; raise listing missing/unexpected/mis-shaped keys."""
    state_dict = drop_unused_class_token(read_pretrained(path, weights_only=weights_only), backbone, str(path))
    is_eva = "eva" in backbone.kinds
    convert = eva.checkpoint_filter_fn if is_eva else vision_transformer.checkpoint_filter_fn
    state_dict = convert(state_dict, backbone)
    expected = {k: v for k, v in backbone.state_dict().items() if k in backbone.vit_state_keys}
    dropped = sorted(k for k in state_dict if k not in expected and k.startswith(PRETRAIN_ONLY_PREFIXES))
    if dropped:
        logger.info("%s: dropping %d pretraining-only keys: %s", path, len(dropped), ", ".join(dropped))
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    kept = sorted(k for k in expected if k not in state_dict and k.startswith(OPTIONAL_PREFIXES))
    if kept:
        logger.warning("%s has no %s (a pooled classifier's file): the final norm keeps its initialisation", path,
                       ", ".join(kept))
    raise_on_mismatch(expected, state_dict, f"MODEL.BACKBONE.PRETRAINED {path} does not fit the backbone's ViT",
                      optional=tuple(kept), source_name="file")
    incompatible = backbone.load_state_dict(state_dict, strict=False)
    logger.info("initialised the ViT from %s (%d tensors); newly initialised: %d tensors", path, len(state_dict),
                len(incompatible.missing_keys))
