"""algm_d2's checkpoints of the merged-token network in the layout of Mask2Former's ``MaskFormer``.

``MaskFormer`` keeps the backbone at ``backbone.*`` (algm_d2's name) and the head at ``sem_seg_head.*``, where
algm_d2's ``MergedTokenMask2Former`` has ``decoder.*`` (and its trainer's ``model.pth`` adds ``net.``)::

    state = to_maskformer_layout(read_state_dict("model.pth"))
    torch.save({"model": state}, "model_maskformer.pth")       # MODEL.WEIGHTS for MaskFormer + the bridged parts
"""
from __future__ import annotations

from typing import Dict, Mapping

from torch import Tensor

# algm_d2 prefix -> MaskFormer prefix; "net." (algm_d2's SegmentationModel) is removed first.
RENAMES = {"backbone.": "backbone.", "decoder.": "sem_seg_head."}


def to_maskformer_layout(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Keys of algm_d2's ``MergedTokenMask2Former`` (or of its SegmentationModel) → those of ``MaskFormer`` with
    ``build_algm_vit_backbone`` and ``build_merged_token_mask2former_head``; a key of neither raises KeyError."""
    out = {}
    for key, value in state_dict.items():
        name = key[len("net."):] if key.startswith("net.") else key
        prefix = next((p for p in RENAMES if name.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"{key}: not a key of algm_d2's MergedTokenMask2Former (backbone.*, decoder.*)")
        out[RENAMES[prefix] + name[len(prefix):]] = value
    return out
