"""The tokens of chosen encoder blocks (SETR's and SegViT's heads read intermediate layers), with their merge states.

The encoder runs block ranges between the taps (:meth:`ALGMViT.run_blocks`, as ViT-Adapter does); each tap keeps
the (merged) sequence leaving its block and the merge state it belongs to, so a head can unmerge it with one gather.
Blocks after the last tap are not run: no head reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from torch import Tensor

from ...merge import ALGMConfig, MergeState
from ..merged_tokens import patches_to_grid
from .algm_vit import ALGMViT


@dataclass(frozen=True)
class Tap:
    """The sequence leaving one block: ``tokens`` ``[B, T, C]`` (prefix first) and its merge ``state``."""

    tokens: Tensor
    state: MergeState

    @property
    def patches(self) -> Tensor:
        """The (merged) patch tokens ``[B, T - P, C]``."""
        return self.tokens[:, self.state.num_prefix:]

    def grid(self, patches: Optional[Tensor] = None) -> Tensor:
        """``patches`` (default: this tap's; any per-token features ``[B, T - P, D]``) unmerged to ``[B, D, h, w]``."""
        return patches_to_grid(self.patches if patches is None else patches, self.state)


def check_taps(layers: Sequence[int], depth: int, key: str) -> Tuple[int, ...]:
    """0-based block indices (negative ones count from the end, as mmseg's ``in_index``) → sorted unique indices;
    raises naming ``key`` when one is out of range."""
    resolved = []
    for layer in layers:
        index = int(layer) + depth if int(layer) < 0 else int(layer)
        if not 0 <= index < depth:
            raise ValueError(f"{key}: block index {layer} is out of range for a {depth}-block encoder")
        resolved.append(index)
    return tuple(sorted(set(resolved)))


def run_to_taps(encoder: ALGMViT, images: Tensor, layers: Sequence[int], algm: Optional[ALGMConfig] = None
                ) -> Tuple[Dict[int, Tap], MergeState]:
    """Normalized images → ``{block index: Tap}`` for the 0-based ``layers`` and the last state (for merge stats)."""
    x, grid, grid_rope = encoder.embed(images)
    stream = encoder.start(x, grid, grid_rope, algm)
    taps: Dict[int, Tap] = {}
    start = 0
    for layer in check_taps(layers, encoder.depth, "taps"):
        encoder.run_blocks(stream, start, layer + 1)
        taps[layer] = Tap(stream.x, stream.state)
        start = layer + 1
    return taps, stream.state
