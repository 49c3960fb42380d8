"""What SETR and SegViT share: a plain ViT with ALGM whose heads read the tokens of chosen blocks (taps)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ...merge import MergeState
from ..backbone.algm_vit import ALGMViT
from ..backbone.taps import Tap, check_taps, run_to_taps
from .merging import MergingNetwork
from .segmenter import pad_to_multiple


class TappedViTNet(MergingNetwork, nn.Module):
    """Padding to the patch size, the encoder run up to the deepest tap, ALGM switches and merge stats.

    Args:
        backbone: the ALGM encoder (its ``algm`` config decides the merging).
        num_classes: K; ignore_value: the label no loss reads.
    """

    def __init__(self, *, backbone: ALGMViT, num_classes: int, ignore_value: int = 255) -> None:
        super().__init__()
        if not isinstance(backbone, ALGMViT):  # a ViTAdapter returns feature maps, not tokens
            raise ValueError(f"MODEL.BACKBONE.NAME: {type(self).__name__} reads the tokens of ALGMViT, got "
                             f"{type(backbone).__name__}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.patch_size = backbone.patch_size[0]
        self._last_state: Optional[MergeState] = None

    def resolve_taps(self, layers: Sequence[int], key: str) -> Tuple[int, ...]:
        """0-based (negative: from the end) block indices of config ``key`` → in-range indices, in the given order."""
        return tuple(check_taps([layer], self.backbone.depth, key)[0] for layer in layers)

    def encode(self, padded: Tensor, layers: Sequence[int]) -> Dict[int, Tap]:
        """Run the encoder on padded images up to the deepest of ``layers``; record the state for merge stats."""
        taps, self._last_state = run_to_taps(self.backbone, padded, layers)
        return taps

    def pad(self, images: Tensor) -> Tensor:
        return pad_to_multiple(images, self.patch_size)

    def pad_targets(self, targets: Tensor, size: Tuple[int, int]) -> Tensor:
        """Labels ``[B, H, W]`` padded bottom/right with the ignore value to the padded image ``size``."""
        pad = (0, size[1] - targets.shape[-1], 0, size[0] - targets.shape[-2])
        return F.pad(targets, pad, value=self.ignore_value)
