"""Packed layout of a per-image merged batch: the valid tokens of all images back to back, no padding.

Under the ``per_image`` policy images keep different numbers of tokens and the batch is padded to the longest.
Per-token layers (norms, linears, MLPs) then waste work on padding and attention needs a mask, which rules out the
fastest kernels. Packing keeps only the valid tokens (``[total, C]``) with cumulative sequence offsets, the layout of
variable-length (flash) attention. Pack and unpack are single gathers, with no host sync (the total is known on the
host from the merge stage's own sync). Torch only: a one-launch CUDA builder of the layout lives in
``algm_d2.modeling.ops.packed_layout``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .state import MergeState

# (counts [B], seq_len, rows, zero_tail) -> (cu_seqlens [B + 1] int32, pack_index [rows] long): see layout_torch
LayoutBuilder = Callable[[Tensor, int, int, bool], Tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class SequenceOffsets:
    """Where each image's rows sit in a packed ``[rows, ...]`` tensor: all that variable-length attention reads.

    Attributes:
        cu_seqlens: ``[B + 1]`` int32 cumulative token counts (image b owns rows ``cu[b]:cu[b+1]``); rows past
            ``cu[B]`` belong to no image (a CUDA-graph bucket's tail) and are ignored.
        max_seqlen: an upper bound of the longest image (the padded sequence length).
    """

    cu_seqlens: Tensor
    max_seqlen: int

    @property
    def batch(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def valid_mask(self) -> Tensor:
        """``[B, max_seqlen]`` bool: the slots of the padded batch that hold a token."""
        counts = (self.cu_seqlens[1:] - self.cu_seqlens[:-1])[:, None]
        return torch.arange(self.max_seqlen, device=counts.device) < counts


@dataclass(frozen=True)
class PackedLayout(SequenceOffsets):
    """The offsets plus the gathers between the padded batch and the packed one.

    Attributes:
        total: all valid tokens (host int).
        pack_index: ``[total]`` long, row of the flattened padded batch ``[B*T]`` each packed row comes from (and
            goes back to).
    """

    total: int
    pack_index: Tensor

    @classmethod
    def from_state(cls, state: MergeState, build: Optional[LayoutBuilder] = None) -> "PackedLayout":
        if state.total_tokens is None:
            raise ValueError("the merge state does not know its total token count on the host; cannot pack")
        return cls.from_counts(state.num_tokens, state.sizes.shape[1], state.total_tokens, build)

    @classmethod
    def from_counts(cls, counts: Tensor, seq_len: int, total: int, build: Optional[LayoutBuilder] = None
                    ) -> "PackedLayout":
        """Images whose ``counts[b]`` valid tokens lead rows of ``seq_len``; ``total`` = their sum (a host int).
        ``build`` computes the offsets and gathers (default :func:`layout_torch`; the model layer passes a
        one-launch kernel on CUDA)."""
        cu_seqlens, pack_index = (build or layout_torch)(counts, seq_len, total, False)
        return cls(cu_seqlens, seq_len, total, pack_index)

    def pack(self, x: Tensor) -> Tensor:
        """Padded ``[B, T, C]`` → packed ``[total, C]``."""
        return x.flatten(0, 1).index_select(0, self.pack_index)

    def unpack(self, packed: Tensor) -> Tensor:
        """Packed ``[total, C]`` → padded ``[B, T, C]`` with zeros on padding (one zero fill and one row copy)."""
        padded = packed.new_zeros(self.batch * self.max_seqlen, packed.shape[-1])
        return padded.index_copy_(0, self.pack_index, packed).view(self.batch, self.max_seqlen, packed.shape[-1])


def slots_of_rows(cu_seqlens: Tensor, seq_len: int, rows: int, tail: int) -> Tensor:
    """``[rows]`` long: the slot ``image * seq_len + position`` of each packed row in the flattened padded batch, and
    ``tail`` for rows past the last image."""
    cu = cu_seqlens.long()
    row = torch.arange(rows, device=cu.device)
    image = torch.searchsorted(cu[1:], row, right=True)
    owner = image.clamp(max=cu.shape[0] - 2)
    return torch.where(image < cu.shape[0] - 1, owner * seq_len + row - cu[owner], tail)


def layout_torch(counts: Tensor, seq_len: int, rows: int, zero_tail: bool = False) -> Tuple[Tensor, Tensor]:
    """``cu_seqlens`` ``[B + 1]`` and ``pack_index`` ``[rows]`` of images whose ``counts[b]`` valid tokens lead rows
    of ``seq_len``. ``rows`` is their total, or with ``zero_tail`` any bound of it (a CUDA-graph bucket, where the
    host does not know the total): the entries past the total then point at row 0."""
    starts = torch.cumsum(counts, 0) - counts
    cu_seqlens = torch.cat([starts, starts[-1:] + counts[-1:]]).to(torch.int32)
    return cu_seqlens, slots_of_rows(cu_seqlens, seq_len, rows, 0)
