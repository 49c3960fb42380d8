"""Multi-scale deformable attention as Triton kernels (forward and backward), fp32 accumulation.

One program handles a block of queries of one head of one image: it loops over the levels and points (unrolled),
computes the bilinear corners with the ``grid_sample(align_corners=False, padding_mode="zeros")`` convention and
reads each corner as a D-vector of the head (value layout ``[B, S, M, D]``, contiguous along D). The backward
recomputes the corners, accumulates the value gradient with atomic adds and writes the location and weight
gradients. Level sizes are plain integer arguments (no device tensor, no host sync). Up to 4 levels.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_LEVELS = 4


@triton.jit
def _level(level: tl.constexpr, h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3):
    if level == 0:
        return h0, w0, s0
    elif level == 1:
        return h1, w1, s1
    elif level == 2:
        return h2, w2, s2
    else:
        return h3, w3, s3


@triton.jit
def _corner(corner: tl.constexpr, x0, y0, fx, fy):
    """Corner ``corner`` (0: top-left, 1: top-right, 2: bottom-left, 3: bottom-right) of the bilinear cell:
    its pixel, its weight, and the signs of d weight / d fx and d weight / d fy."""
    if corner == 0:
        return x0, y0, (1.0 - fx) * (1.0 - fy), -(1.0 - fy), -(1.0 - fx)
    elif corner == 1:
        return x0 + 1, y0, fx * (1.0 - fy), 1.0 - fy, -fx
    elif corner == 2:
        return x0, y0 + 1, (1.0 - fx) * fy, -fy, 1.0 - fx
    else:
        return x0 + 1, y0 + 1, fx * fy, fy, fx


@triton.jit
def _point(loc, attn, qm, lp, q_ok, h, w, LP: tl.constexpr):
    """Attention weight, top-left source pixel and bilinear fractions of sampling point ``lp`` of rows ``qm``
    (pixel = location · size − 0.5, grid_sample's align_corners=False)."""
    weight = tl.load(attn + qm * LP + lp, mask=q_ok, other=0.0)
    x = tl.load(loc + (qm * LP + lp) * 2, mask=q_ok, other=0.0) * w - 0.5
    y = tl.load(loc + (qm * LP + lp) * 2 + 1, mask=q_ok, other=0.0) * h - 0.5
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return weight, x0.to(tl.int32), y0.to(tl.int32), x - x0, y - y0


@triton.jit
def _corner_rows(corner: tl.constexpr, x0, y0, fx, fy, q_ok, h, w, start, b, S, M: tl.constexpr, m):
    """A corner's bilinear weight and derivatives (see ``_corner``), value rows ``[BLOCK_Q]`` and validity."""
    xi, yi, bilinear, d_fx, d_fy = _corner(corner, x0, y0, fx, fy)
    ok = q_ok & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    row = (b * S + start + yi * w + xi).to(tl.int64) * M + m
    return row, ok, bilinear, d_fx, d_fy


@triton.jit
def _msda_fwd(value, loc, attn, out, S, Lq,
              h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3,
              M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q, m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < Lq
    d_ok = d < D
    qm = (b * Lq + q) * M + m  # row of (image, query, head) in locations / weights
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in tl.static_range(L):
        h, w, start = _level(level, h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3)
        for p in tl.static_range(P):
            weight, x0, y0, fx, fy = _point(loc, attn, qm, level * P + p, q_ok, h, w, L * P)
            for corner in tl.static_range(4):
                row, ok, bilinear, _, _ = _corner_rows(corner, x0, y0, fx, fy, q_ok, h, w, start, b, S, M, m)
                v = tl.load(value + row[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
                acc += (weight * bilinear)[:, None] * v
    tl.store(out + qm.to(tl.int64)[:, None] * D + d[None, :], acc, mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _msda_bwd(value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, S, Lq,
              h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3,
              M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_q, m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok = q < Lq
    d_ok = d < D
    qm = (b * Lq + q) * M + m
    g = tl.load(grad_out + qm.to(tl.int64)[:, None] * D + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    for level in tl.static_range(L):
        h, w, start = _level(level, h0, w0, s0, h1, w1, s1, h2, w2, s2, h3, w3, s3)
        for p in tl.static_range(P):
            lp = level * P + p
            weight, x0, y0, fx, fy = _point(loc, attn, qm, lp, q_ok, h, w, L * P)
            sample_grad = tl.zeros([BLOCK_Q], dtype=tl.float32)  # d loss / d weight
            gx = tl.zeros([BLOCK_Q], dtype=tl.float32)  # d sample / d fx, dotted with g
            gy = tl.zeros([BLOCK_Q], dtype=tl.float32)
            for corner in tl.static_range(4):
                row, ok, bilinear, dbilinear_dfx, dbilinear_dfy = _corner_rows(corner, x0, y0, fx, fy, q_ok, h, w,
                                                                               start, b, S, M, m)
                mask = ok[:, None] & d_ok[None, :]
                v = tl.load(value + row[:, None] * D + d[None, :], mask=mask, other=0.0)
                gv = tl.sum(g * v, axis=1)
                sample_grad += bilinear * gv
                gx += dbilinear_dfx * gv
                gy += dbilinear_dfy * gv
                tl.atomic_add(grad_value + row[:, None] * D + d[None, :], (weight * bilinear)[:, None] * g, mask=mask)
            tl.store(grad_attn + qm * (L * P) + lp, sample_grad, mask=q_ok)
            tl.store(grad_loc + (qm * (L * P) + lp) * 2, weight * gx * w, mask=q_ok)
            tl.store(grad_loc + (qm * (L * P) + lp) * 2 + 1, weight * gy * h, mask=q_ok)


def _level_args(spatial_shapes: Sequence[Tuple[int, int]]) -> list:
    if not 1 <= len(spatial_shapes) <= MAX_LEVELS:
        raise ValueError(f"the Triton MSDA kernel takes 1..{MAX_LEVELS} levels, got {len(spatial_shapes)}")
    args, start = [], 0
    for h, w in list(spatial_shapes) + [(0, 0)] * (MAX_LEVELS - len(spatial_shapes)):
        args += [int(h), int(w), start]
        start += int(h) * int(w)
    return args


def _launch_config(lq: int, m: int, b: int, d: int) -> Tuple[tuple, dict]:
    block_d = triton.next_power_of_2(d)
    block_q = 64 if block_d <= 64 else 32
    return (triton.cdiv(lq, block_q), m, b), {"BLOCK_Q": block_q, "BLOCK_D": block_d}


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, locations: Tensor, weights: Tensor, spatial_shapes: tuple) -> Tensor:  # noqa: ANN001
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        b, s, m, d = value.shape
        _, lq, _, num_levels, p, _ = locations.shape
        out = torch.empty(b, lq, m, d, device=value.device, dtype=torch.float32)
        grid, meta = _launch_config(lq, m, b, d)
        _msda_fwd[grid](value, locations, weights, out, s, lq, *_level_args(spatial_shapes), M=m, D=d,
                        L=num_levels, P=p, **meta)
        ctx.save_for_backward(value, locations, weights)
        ctx.spatial_shapes = spatial_shapes
        return out.view(b, lq, m * d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: ANN001, ANN205
        value, locations, weights = ctx.saved_tensors
        b, s, m, d = value.shape
        _, lq, _, num_levels, p, _ = locations.shape
        grad_value = torch.zeros_like(value)
        grad_loc = torch.empty_like(locations)
        grad_attn = torch.empty_like(weights)
        grid, meta = _launch_config(lq, m, b, d)
        _msda_bwd[grid](value, locations, weights, grad_out.contiguous().float(), grad_value, grad_loc, grad_attn, s,
                        lq, *_level_args(ctx.spatial_shapes), M=m, D=d, L=num_levels, P=p, **meta)
        return grad_value, grad_loc, grad_attn, None


def ms_deform_attn_triton(value: Tensor, spatial_shapes: Sequence[Tuple[int, int]], locations: Tensor,
                          weights: Tensor) -> Tensor:
    """The op of :func:`~algm_d2.modeling.ops.msda.ms_deform_attn_reference` (float32 inputs) → ``[B, Lq, M*D]``."""
    return _MSDeformAttnFunction.apply(value, locations, weights, tuple(tuple(int(v) for v in hw)
                                                                        for hw in spatial_shapes))
