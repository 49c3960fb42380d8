"""Triton kernel of :func:`~algm_d2.modeling.ops.upsample_argmax.upsample_argmax` (see there for the contract)."""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _upsample_argmax(logits, labels, K, h, w, H, W, scale_h, scale_w,
                     ROUND_BF16: tl.constexpr, ROUND_FP16: tl.constexpr, BLOCK: tl.constexpr):
    pid, b = tl.program_id(0), tl.program_id(1)
    pixel = pid * BLOCK + tl.arange(0, BLOCK)
    ok = pixel < H * W
    y = pixel // W
    x = pixel % W
    # PyTorch's area_pixel_compute_source_index (align_corners=False), clamped at 0, then its corner weights.
    sy = tl.maximum(scale_h * (y.to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum(scale_w * (x.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    y1 = y0 + (y0 < h - 1).to(tl.int32)
    x1 = x0 + (x0 < w - 1).to(tl.int32)
    ly1 = sy - y0.to(tl.float32)
    lx1 = sx - x0.to(tl.float32)
    ly0 = 1.0 - ly1
    lx0 = 1.0 - lx1
    base = logits + b.to(tl.int64) * K * h * w
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_k = tl.zeros([BLOCK], tl.int64)
    for k in range(K):
        plane = base + k * h * w
        v00 = tl.load(plane + y0 * w + x0, mask=ok, other=0.0).to(tl.float32)
        v01 = tl.load(plane + y0 * w + x1, mask=ok, other=0.0).to(tl.float32)
        v10 = tl.load(plane + y1 * w + x0, mask=ok, other=0.0).to(tl.float32)
        v11 = tl.load(plane + y1 * w + x1, mask=ok, other=0.0).to(tl.float32)
        value = ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
        if ROUND_BF16:  # interpolate's output is in the input dtype: ties appear there, argmax sees them
            # round to nearest even on the bits (Triton's interpreter truncates in its bf16 cast; CUDA does not)
            bits = value.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            value = bits.to(tl.float32, bitcast=True)
        if ROUND_FP16:
            value = value.to(tl.float16).to(tl.float32)
        better = value > best  # strict: the first maximum wins, as argmax
        best = tl.where(better, value, best)
        best_k = tl.where(better, k, best_k)
    tl.store(labels + b.to(tl.int64) * H * W + pixel, best_k, mask=ok)


def upsample_argmax_triton(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"upsample_argmax: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    logits = logits.contiguous()
    b, k, h, w = logits.shape
    height, width = size
    labels = torch.empty(b, height, width, dtype=torch.long, device=logits.device)
    block = 256
    # float32 scales as PyTorch's accscalar_t (input / output size)
    scale_h = float(torch.tensor(h, dtype=torch.float32) / height)
    scale_w = float(torch.tensor(w, dtype=torch.float32) / width)
    _upsample_argmax[(triton.cdiv(height * width, block), b)](
        logits, labels, k, h, w, height, width, scale_h, scale_w,
        ROUND_BF16=logits.dtype == torch.bfloat16, ROUND_FP16=logits.dtype == torch.float16, BLOCK=block)
    return labels
