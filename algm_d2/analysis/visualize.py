"""Figure 5: which grid cells each merge stage grouped, read from the merge states after the merging layers."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

from ..merge import MergeState
from ..modeling import SegmentationModel
from ..modeling.meta_arch.segmenter import pad_to_multiple


def layout(state: MergeState) -> MergeState:
    """The merged layout of a state (under the no-reduction ablation, the one it tracks)."""
    return state.virtual if state.virtual is not None else state


def input_multiple(model: SegmentationModel) -> int:
    """What the network pads its input to a multiple of: the patch, or Mask2Former's size divisibility."""
    return max(getattr(model.net, "size_divisibility", 0), model.net.backbone.patch_size[0])


@torch.no_grad()
def states_after_merges(model: SegmentationModel, image: Tensor) -> Dict[int, MergeState]:
    """Run the encoder on one uint8 image ``[3, H, W]`` (normalized and padded as the network does) and return the
    merged layout after each layer where the model's ALGM config merges."""
    encoder = model.net.backbone
    images = pad_to_multiple(model._normalize(image)[None], input_multiple(model))  # noqa: SLF001
    seen: Dict[int, MergeState] = {}

    def observe(layer: int, tokens: Tensor, state: MergeState) -> None:
        seen[layer] = state

    _, final = encoder(images, observer=observe)
    config = encoder.algm
    after: Dict[int, MergeState] = {}
    for layer in range(1, encoder.depth + 1):
        if config.merges_at(layer):
            after[layer] = layout(seen.get(layer + 1, final))
    return after


def merge_groups(state: MergeState, image: int = 0) -> List[List[int]]:
    """The groups of more than one grid cell (row-major cell ids) of ``image``, largest first."""
    slots = state.index_map[image]
    order = torch.argsort(slots, stable=True)
    _, counts = torch.unique_consecutive(slots[order], return_counts=True)
    groups = [cells.tolist() for cells in torch.split(order, counts.tolist()) if len(cells) > 1]
    return sorted(groups, key=lambda cells: (-len(cells), cells[0]))
