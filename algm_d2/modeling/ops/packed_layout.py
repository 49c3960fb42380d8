"""The packed layout of a per-image batch built in one Triton launch on CUDA (the torch ops take ~10 small kernels,
and the eager per-image path is bound by the host's launches); elsewhere the torch reference of
:mod:`algm_d2.merge.packing`."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ...merge.packing import PackedLayout, layout_torch
from ...merge.state import MergeState

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def build_layout(counts: Tensor, seq_len: int, rows: int, zero_tail: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`algm_d2.merge.packing.layout_torch`'s result, from one Triton launch when ``counts`` is on CUDA."""
    build = layout_triton if counts.is_cuda and triton is not None else layout_torch
    return build(counts, seq_len, rows, zero_tail)


def packed_layout_of(state: MergeState) -> PackedLayout:
    """Where the valid tokens of the padded per-image batch ``state`` describes sit when packed."""
    return PackedLayout.from_state(state, build_layout)


def layout_triton(counts: Tensor, seq_len: int, rows: int, zero_tail: bool = False) -> Tuple[Tensor, Tensor]:
    """:func:`build_layout` from one Triton launch."""
    batch = counts.shape[0]
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=counts.device)
    pack_index = (torch.zeros if zero_tail else torch.empty)(rows, dtype=torch.long, device=counts.device)
    _layout_kernel[(batch,)](counts.long().contiguous(), cu_seqlens, pack_index, batch, seq_len,
                             BLOCK_B=triton.next_power_of_2(batch), BLOCK_ROWS=1024)
    return cu_seqlens, pack_index


if triton is not None:

    @triton.jit
    def _layout_kernel(counts, cu_seqlens, pack_index, batch, seq_len, BLOCK_B: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr):
        # one program per image: its start is the sum of the counts before it; its rows are image * seq_len + r
        image = tl.program_id(0)
        images = tl.arange(0, BLOCK_B)
        start = tl.sum(tl.load(counts + images, mask=images < image, other=0))
        count = tl.load(counts + image)
        tl.store(cu_seqlens + image, start.to(tl.int32))
        if image == batch - 1:
            tl.store(cu_seqlens + batch, (start + count).to(tl.int32))
        for first in tl.range(0, count, BLOCK_ROWS):
            rows = first + tl.arange(0, BLOCK_ROWS)
            tl.store(pack_index + start + rows, image.to(tl.int64) * seq_len + rows, mask=rows < count)
