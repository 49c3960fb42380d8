"""Self-attention over packed variable-length sequences (``[total, H, D]`` + cumulative offsets).

On CUDA the packed tokens go straight to a variable-length kernel, with no padding and no mask, so per-image token
counts cost nothing extra: flash attention's (``torch.nn.attention.varlen``) in float16/bfloat16, the memory-efficient
(CUTLASS) kernel's ``cu_seqlens`` mode otherwise (float32: on an H100/H200 at Seg-S/B/L shapes 1.7–1.9× faster than
padding + a key mask, within 10% of a dense batch of the same total). cuDNN's ``cum_seq`` mode is not used: in torch
2.11 it rebuilt its plan on every call (~43 ms). Elsewhere (CPU) the reference pads back to ``[B, T]``, masks the
padding keys and runs SDPA — the same numbers the padded path gives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...merge.packing import PackedLayout

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _flash_varlen
except ImportError:  # pragma: no cover - older torch: the memory-efficient kernel or the reference
    _flash_varlen = None


def flash_varlen_available(x: Tensor) -> bool:
    return _flash_varlen is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def efficient_varlen_available(x: Tensor) -> bool:
    """The memory-efficient kernel takes packed sequences on CUDA for head dims that are a multiple of 4 (8 for
    half precision) up to 128."""
    dim = x.shape[-1]
    return x.is_cuda and dim <= 128 and dim % (4 if x.dtype == torch.float32 else 8) == 0


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """Pad → SDPA with a key-padding mask → pack (the padded path's arithmetic)."""
    total, heads, dim = q.shape
    batch, seq_len = layout.cu_seqlens.shape[0] - 1, layout.max_seqlen
    padded = [layout.unpack(t.reshape(total, heads * dim)).view(batch, seq_len, heads, dim).transpose(1, 2)
              for t in (q, k, v)]
    keys = (layout.unpack_index < layout.total).view(batch, 1, 1, seq_len)
    out = F.scaled_dot_product_attention(*padded, attn_mask=keys)
    return layout.pack(out.transpose(1, 2).reshape(batch, seq_len, heads * dim)).view(total, heads, dim)


def varlen_attention_efficient(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """The memory-efficient kernel on the packed batch (``[1, total, H, D]`` with ``cu_seqlens``)."""
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    out = torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu, cu, longest, longest,
                                                      0.0, 0, False)[0]
    return out[0]


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout) -> Tensor:
    """Softmax(q·kᵀ/√D)·v within each image of the packed batch; ``q, k, v`` ``[total, H, D]`` → ``[total, H, D]``."""
    if flash_varlen_available(q):
        return _flash_varlen(q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen)
    if efficient_varlen_available(q):
        return varlen_attention_efficient(q, k, v, layout)
    return varlen_attention_reference(q, k, v, layout)


def packed_attention_residual(block: nn.Module, x: Tensor, layout: PackedLayout) -> Tensor:
    """``x + attn(norm1(x))`` of a timm ViT ``Block`` on packed tokens ``[total, C]``: the block's own parts around
    the variable-length kernel (inference: no attention dropout)."""
    attn = block.attn
    total = x.shape[0]
    q, k, v = attn.qkv(block.norm1(x)).view(total, 3, attn.num_heads, attn.head_dim).unbind(1)
    out = varlen_attention(attn.q_norm(q), attn.k_norm(k), v, layout).reshape(total, -1)
    out = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(out)))
    return x + block.drop_path1(block.ls1(out))
