"""Self-attention over packed variable-length sequences (``[total, H, D]`` + cumulative offsets).

On CUDA the packed tokens go straight to a variable-length kernel, with no padding and no mask, so per-image token
counts cost nothing extra. In float16/bfloat16 (head dims 32/64/128, inference) it is our Triton kernel (flash
attention's forward with one program per query block, image and head; faster than flash attention's varlen kernel
at the Segmenter shapes, ``torch.nn.attention.varlen``, which remains for other head dims and for autograd); in
float32 the memory-efficient (CUTLASS) kernel's ``cu_seqlens`` mode. cuDNN's ``cum_seq`` mode is not used: it
rebuilds its plan when the lengths change. Elsewhere (CPU) the reference pads back to ``[B, T]``, masks the padding
keys and runs SDPA — the same numbers the padded path gives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...merge.packing import SequenceOffsets, slots_of_rows

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _flash_varlen
except ImportError:  # pragma: no cover - older torch: the memory-efficient kernel or the reference
    _flash_varlen = None
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Head dims and tile (query rows, key rows, warps, pipeline stages) of the Triton kernel (the best of the tiles tried
# at the Segmenter shapes)
_TRITON_DIMS = (32, 64, 128)
_TRITON_TILE = (64, 64, 4, 3)


def flash_varlen_available(x: Tensor) -> bool:
    return _flash_varlen is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def triton_varlen_available(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Our kernel: CUDA half precision, head dim in ``_TRITON_DIMS``, unit stride along it, no autograd (it has no
    backward) and no jit trace (a Triton launch does not trace)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in _TRITON_DIMS and all(t.stride(-1) == 1 for t in (q, k, v)) and not needs_grad
            and not torch.jit.is_tracing())


def efficient_varlen_available(x: Tensor) -> bool:
    """The memory-efficient kernel takes packed sequences on CUDA for head dims that are a multiple of 4 (8 for
    half precision) up to 128."""
    dim = x.shape[-1]
    return x.is_cuda and dim <= 128 and dim % (4 if x.dtype == torch.float32 else 8) == 0


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, offsets: SequenceOffsets) -> Tensor:
    """Pad → SDPA with a key-padding mask → pack (the padded path's arithmetic); rows past the last image give 0."""
    rows, heads, dim = q.shape
    batch, seq_len = offsets.batch, offsets.max_seqlen
    # slot of each row in the padded batch; rows of no image go to one trash slot after it
    slot = slots_of_rows(offsets.cu_seqlens, seq_len, rows, batch * seq_len)
    padded = [t.new_zeros(batch * seq_len + 1, heads * dim).index_copy_(0, slot, t.reshape(rows, heads * dim))
              [:-1].view(batch, seq_len, heads, dim).transpose(1, 2) for t in (q, k, v)]
    keys = offsets.valid_mask().view(batch, 1, 1, seq_len)
    out = F.scaled_dot_product_attention(*padded, attn_mask=keys).transpose(1, 2).reshape(batch * seq_len, -1)
    return torch.cat([out, out.new_zeros(1, heads * dim)]).index_select(0, slot).view(rows, heads, dim)


def varlen_attention_efficient(q: Tensor, k: Tensor, v: Tensor, offsets: SequenceOffsets) -> Tensor:
    """The memory-efficient kernel on the packed batch (``[1, total, H, D]`` with ``cu_seqlens``)."""
    cu, longest = offsets.cu_seqlens, offsets.max_seqlen
    out = torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu, cu, longest, longest,
                                                      0.0, 0, False)[0]
    return out[0]


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, offsets: SequenceOffsets) -> Tensor:
    """Softmax(q·kᵀ/√D)·v within each image of the packed batch; ``q, k, v`` ``[total, H, D]`` → ``[total, H, D]``."""
    if triton_varlen_available(q, k, v):
        return varlen_attention_triton(q, k, v, offsets)
    if flash_varlen_available(q):
        cu, longest = offsets.cu_seqlens, offsets.max_seqlen
        return _flash_varlen(q, k, v, cu, cu, longest, longest)
    if efficient_varlen_available(q):
        return varlen_attention_efficient(q, k, v, offsets)
    return varlen_attention_reference(q, k, v, offsets)


def packed_attention_residual(block: nn.Module, x: Tensor, offsets: SequenceOffsets) -> Tensor:
    """``x + attn(norm1(x))`` of a timm ViT ``Block`` on packed tokens ``[total, C]``: the block's own parts around
    the variable-length kernel (inference: no attention dropout)."""
    attn = block.attn
    total = x.shape[0]
    q, k, v = attn.qkv(block.norm1(x)).view(total, 3, attn.num_heads, attn.head_dim).unbind(1)
    out = varlen_attention(attn.q_norm(q), attn.k_norm(k), v, offsets).reshape(total, -1)
    out = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(out)))
    return x + block.drop_path1(block.ls1(out))


if triton is not None:

    @triton.jit
    def _online_softmax_step(q_block, k_block, v_block, best, total, acc, scale_log2, live,
                             MASKED: tl.constexpr):
        """Fold one key block into the running (row max, row sum, accumulator) of flash attention, in log2 units.
        The scale rides on the exponent's fma (``s·scale − max``) and only the image's last, partial key block pays
        for a mask: with head dims of 64 the softmax's per-score instructions, not the tensor cores, bound the loop."""
        scores = tl.dot(q_block, tl.trans(k_block))
        if MASKED:
            scores = tl.where(live[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1) * scale_log2)
        weights = tl.math.exp2(scores * scale_log2 - new_best[:, None])
        correction = tl.math.exp2(best - new_best)
        total = total * correction + tl.sum(weights, axis=1)
        acc = acc * correction[:, None] + tl.dot(weights.to(v_block.dtype), v_block)
        return new_best, total, acc

    @triton.jit
    def _varlen_attention_kernel(q, k, v, out, cu_seqlens, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                                 stride_vh, stride_ot, stride_oh, scale_log2, DIM: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # one program per (query block, image, head): online softmax over the image's key blocks (flash attention's
        # forward), fp32 statistics and accumulator, products in the inputs' dtype on the tensor cores
        block_m = tl.program_id(0)
        image = tl.program_id(1)
        head = tl.program_id(2).to(tl.int64)
        start = tl.load(cu_seqlens + image).to(tl.int64)
        length = tl.load(cu_seqlens + image + 1).to(tl.int32) - start.to(tl.int32)
        if block_m * BLOCK_M < length:
            rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
            dims = tl.arange(0, DIM)
            q_block = tl.load(q + (start + rows[:, None]) * stride_qt + head * stride_qh + dims[None, :],
                              mask=rows[:, None] < length, other=0.0)
            best = tl.full([BLOCK_M], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, DIM], tl.float32)
            k_rows = k + start * stride_kt + head * stride_kh + dims[None, :]
            v_rows = v + start * stride_vt + head * stride_vh + dims[None, :]
            full = length // BLOCK_N * BLOCK_N
            for first in tl.range(0, full, BLOCK_N):
                cols = first + tl.arange(0, BLOCK_N)
                k_block = tl.load(k_rows + cols[:, None] * stride_kt)
                v_block = tl.load(v_rows + cols[:, None] * stride_vt)
                best, total, acc = _online_softmax_step(q_block, k_block, v_block, best, total, acc, scale_log2,
                                                        cols < length, False)
            if full < length:
                cols = full + tl.arange(0, BLOCK_N)
                live = cols < length
                k_block = tl.load(k_rows + cols[:, None] * stride_kt, mask=live[:, None], other=0.0)
                v_block = tl.load(v_rows + cols[:, None] * stride_vt, mask=live[:, None], other=0.0)
                best, total, acc = _online_softmax_step(q_block, k_block, v_block, best, total, acc, scale_log2,
                                                        live, True)
            acc = acc / total[:, None]
            tl.store(out + (start + rows[:, None]) * stride_ot + head * stride_oh + dims[None, :],
                     acc.to(out.dtype.element_ty), mask=rows[:, None] < length)


def varlen_attention_triton(q: Tensor, k: Tensor, v: Tensor, offsets: SequenceOffsets) -> Tensor:
    """The Triton kernel above on ``[total, H, D]`` views (any token/head strides, unit stride along D)."""
    if triton is None:
        raise RuntimeError("varlen_attention_triton needs triton")
    total, heads, dim = q.shape
    if dim not in _TRITON_DIMS or any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"varlen_attention_triton: head dim must be one of {_TRITON_DIMS} with unit stride, got "
                         f"shape {tuple(q.shape)} strides {q.stride()}")
    out = torch.empty(total, heads, dim, dtype=q.dtype, device=q.device)
    block_m, block_n, warps, stages = _TRITON_TILE
    grid = (triton.cdiv(offsets.max_seqlen, block_m), offsets.batch, heads)
    _varlen_attention_kernel[grid](q, k, v, out, offsets.cu_seqlens, q.stride(0), q.stride(1), k.stride(0),
                                   k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                                   dim ** -0.5 * 1.4426950408889634, DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n,
                                   num_warps=warps, num_stages=stages)
    return out
