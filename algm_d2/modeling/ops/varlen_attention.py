"""Self-attention over packed variable-length sequences (``[total, H, D]`` + cumulative offsets).

On CUDA in fp16/bf16 it is flash attention's variable-length kernel (``torch.nn.attention.varlen``): no padding and
no mask, so per-image token counts cost nothing extra. Elsewhere (CPU, fp32) the reference pads back to
``[B, T]``, masks the padding keys and runs SDPA — the same numbers the padded path gives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...merge.packing import PackedLayout

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _flash_varlen
except ImportError:  # pragma: no cover - older torch: the reference path only
    _flash_varlen = None


def flash_varlen_available(x: Tensor) -> bool:
    return _flash_varlen is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """Pad → SDPA with a key-padding mask → pack (the padded path's arithmetic)."""
    total, heads, dim = q.shape
    batch, seq_len = layout.cu_seqlens.shape[0] - 1, layout.max_seqlen
    padded = [layout.unpack(t.reshape(total, heads * dim)).view(batch, seq_len, heads, dim).transpose(1, 2)
              for t in (q, k, v)]
    keys = (layout.unpack_index < layout.total).view(batch, 1, 1, seq_len)
    out = F.scaled_dot_product_attention(*padded, attn_mask=keys)
    return layout.pack(out.transpose(1, 2).reshape(batch, seq_len, heads * dim)).view(total, heads, dim)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """Softmax(q·kᵀ/√D)·v within each image of the packed batch; ``q, k, v`` ``[total, H, D]`` → ``[total, H, D]``."""
    if flash_varlen_available(q):
        return _flash_varlen(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen)
    return varlen_attention_reference(q, k, v, layout)
