"""The decode tail: bilinear upsampling of class logits, alone or fused with the argmax over classes.

:func:`upsample_bilinear` is ``F.interpolate(logits, size, mode="bilinear", align_corners=False)`` with identical
values (as a contiguous NCHW tensor); on CUDA one Triton pass over the output (PyTorch's NHWC kernel, which the
Segmenter head's channels-last logits take, reaches a small fraction of the memory bandwidth).

``F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(1)`` writes and re-reads a
``[B, K, H, W]`` tensor (2.5 GB for 32 images, 150 classes, 512²). :func:`upsample_argmax` returns the same labels
and, on CUDA, never materialises that tensor:

1. ``_cell_candidates``: for every source cell (the 2×2 source pixels ``(y0, x0)``, ``(y0, x1)``, ``(y1, x0)``,
   ``(y1, x1)`` that the output pixels mapped onto it interpolate) the classes that can win anywhere in the cell.
   A bilinear value lies between the smallest and the largest of its four corners, so class ``j`` cannot be the
   argmax when its largest corner is below the smallest corner of another class; the comparison keeps a margin
   that covers float32 rounding and, for bfloat16/float16 logits, the rounding of the interpolated value to that
   dtype (which creates ties), so that a pruned class is strictly below the winner after rounding. Smooth logits
   leave one to a few candidates per cell, random ones most of the K.
2. ``_upsample_argmax``: for each output pixel, the bilinear value of each candidate of its cell, with the
   arithmetic of PyTorch's CUDA kernel, rounded to the logits' dtype as ``interpolate``'s output is, keeping the
   first maximum as ``argmax`` does. Only the int64 labels are written; the workspace is the candidate lists,
   ``[B, h·w, K]`` int16 (the size of the logits in bfloat16), of which only the kept entries are touched.
3. ``_upsample_argmax_cells`` replaces both when the output is the input times powers of two ≥ 8 (the Segmenter's
   32² → 512²). Then the source positions are exact and output row ``r`` reads source rows ``y0 = t - 1`` (``t = 0``:
   row 0) for ``r`` in ``[t·f - f/2, t·f + f/2)``: the output splits into f×f blocks (half blocks at the borders)
   whose pixels all interpolate the same cell. One program per block finds the cell's candidates as in 1. and
   evaluates them from the same four corners at every pixel, with the arithmetic of 2.: no workspace, no per-pixel
   gathers, one launch, each corner read by the four blocks around it instead of by every pixel. Here the
   candidates are pruned more tightly: the difference of two classes' values interpolates the differences of their
   corners, so a class below the one with the largest lower bound at all four corners (by the float32 margins)
   never wins (fewer candidates per block, see ``tools/benchmark_decode_tail.py``); as rounding is
   monotone, only classes before that reference, which win ties, need the margin of a bfloat16/float16 rounding
   step. A block left with one candidate writes it without interpolating.

PyTorch's arithmetic, as its ``UpSampleBilinear2d.cu`` computes it (float32):
``src = max(fma(dst + 0.5, in / out, -0.5), 0)``, ``i0 = int(src)``, ``i1 = i0 + (i0 < in - 1)``, ``l1 = src - i0``,
``l0 = 1 - l1``, rows ``fma(l0w, v_x0, l1w * v_x1)``, value ``fma(l0h, top, l1h * bottom)``; the float32 NHWC kernel
(channels-last logits with ≥ 16 classes, e.g. the Segmenter head's) computes the top row as
``fma(l1w, v01, l0w * v00)``. Equal input and output sizes are a copy in PyTorch, hence a plain argmax here.

NaN and infinite logits: a cell with a non-finite corner (or one too large for the margins) keeps every class, and
the comparison ranks NaN above everything with the first NaN winning, as ``argmax`` does; the labels then still
follow PyTorch's arithmetic, including NaN from ``0 * inf``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference alone
    triton = None

# Elements of full-resolution logits the reference materialises at once (1 GiB in float32).
_REFERENCE_CHUNK_ELEMENTS = 1 << 28
# The reference splits classes (only when one image exceeds the chunk) at multiples of this: every class then goes
# through the same kernel (PyTorch's NHWC CUDA kernel needs ≥ 16 channels) and the same vector lanes (CPU) as in
# one call, so the values are bit-identical.
_CLASS_ALIGN = 64
# Margins of the candidate bounds, relative to the largest |corner|: float32 rounding of the interpolation is below
# 2^-21 of it; rounding to bfloat16 / float16 below 2^-8 / 2^-11. An absolute 2^-20 (9.5367431640625e-07 in
# the kernel) covers subnormals.
_MARGIN = {torch.float32: 2.0 ** -18, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -9}
# The one-kernel path's margin for the rounding to bfloat16 / float16, applied only to classes before the reference:
# a rounding step is at most 2^-7 / 2^-10 of the value (module docstring, 3.)
_TIE = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# Corners at or above this magnitude mark the cell as unbounded (all classes): keeps the margins finite and, for
# float16, interpolated values below the dtype's overflow (a rounding to inf would create ties).
_LARGE = {torch.float32: 2.0 ** 100, torch.bfloat16: 2.0 ** 100, torch.float16: 2.0 ** 14}
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CELLS, _CLASSES = 32, 32  # tile of the candidate kernel
# upsample_bilinear's tile (rows, columns, warps): the speed is flat over a wide range of tiles
_UPSAMPLE_TILE = (4, 256, 4)
_TILE_H, _TILE_W = 8, 32  # output pixels per program of the label kernel
# The one-kernel path for power-of-two upsampling factors: factors from 8 (blocks of 64 pixels and more per program);
# classes per register tile (more are visited in tiles, reading the corners twice; one tile of all of a dataset's
# classes was the fastest) and output pixels per warp
_MIN_CELL_FACTOR = 8
_CELL_CLASSES = 256
_CELL_PIXELS_PER_WARP = 256


def _interpolate(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def upsample_argmax_reference(logits: Tensor, size: Tuple[int, int], *,
                              chunk_elements: int = _REFERENCE_CHUNK_ELEMENTS) -> Tensor:
    """The plain expression with at most about ``chunk_elements`` upsampled values alive: whole images while one
    fits, else one image at a time in class chunks merged with ``argmax``'s rules (first maximum, first NaN)."""
    b, k = logits.shape[:2]
    pixels = size[0] * size[1]
    if k * pixels <= chunk_elements:
        step = chunk_elements // (k * pixels)
        return torch.cat([_interpolate(logits[i:i + step], size).argmax(1) for i in range(0, b, step)])
    width = max(_CLASS_ALIGN, chunk_elements // pixels // _CLASS_ALIGN * _CLASS_ALIGN)
    starts = list(range(0, k, width))
    if len(starts) > 1 and k - starts[-1] < _CLASS_ALIGN:
        starts.pop()  # a short last chunk joins the previous one
    bounds = list(zip(starts, starts[1:] + [k]))
    labels = []
    for i in range(b):
        best_value = best_label = None
        for start, stop in bounds:
            upsampled = _interpolate(logits[i:i + 1, start:stop], size)
            label = upsampled.argmax(1)
            value = upsampled.gather(1, label[:, None])[:, 0]
            label += start
            if best_value is None:
                best_value, best_label = value, label
                continue
            better = (value > best_value) | (value.isnan() & ~best_value.isnan())
            best_value = torch.where(better, value, best_value)
            best_label = torch.where(better, label, best_label)
        labels.append(best_label)
    return torch.cat(labels)


def _suggests_channels_last(t: Tensor) -> bool:
    """``Tensor.suggest_memory_format() == channels_last`` (c10's ``is_channels_last_strides_2d``), which decides
    whether CUDA's ``interpolate`` runs its NHWC kernel."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


if triton is not None:

    @triton.jit
    def _corners(image, offset, o00, o01, o10, o11, mask):
        """The four corners ``image[offset + o..]`` as float32 (int32 offsets from one base pointer)."""
        v00 = tl.load(image + (o00 + offset), mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(image + (o01 + offset), mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(image + (o10 + offset), mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(image + (o11 + offset), mask=mask, other=0.0).to(tl.float32)
        return v00, v01, v10, v11

    @triton.jit
    def _class_bounds(v00, v01, v10, v11, MARGIN: tl.constexpr, LARGE: tl.constexpr):
        """Per class: bounds on every value interpolated from these corners, widened by the rounding margin
        (``slack``, also returned), and whether all four corners are finite and below ``LARGE`` (NaN fails every
        comparison: each corner is tested)."""
        large = tl.maximum(tl.maximum(tl.abs(v00), tl.abs(v01)), tl.maximum(tl.abs(v10), tl.abs(v11)))
        slack = MARGIN * large + 9.5367431640625e-07
        low = tl.minimum(tl.minimum(v00, v01), tl.minimum(v10, v11)) - slack
        high = tl.maximum(tl.maximum(v00, v01), tl.maximum(v10, v11)) + slack
        finite = (tl.abs(v00) < LARGE) & (tl.abs(v01) < LARGE) & (tl.abs(v10) < LARGE) & (tl.abs(v11) < LARGE)
        return low, high, finite, slack

    @triton.jit
    def _may_beat(image, k, v00, v01, v10, v11, slack, best_class, o00, o01, o10, o11, stride_k,
                  MARGIN: tl.constexpr, TIE: tl.constexpr):
        """Per class ``k``: whether it may win against ``best_class`` (one with the largest lower bound) anywhere in
        the cell. The difference of two classes' values interpolates the differences of their corners, so a class
        below the reference at all four corners by more than the float32 margins (``slack`` is the class's) is below
        it at every pixel; this prunes more than comparing the upper bound with the best lower bound (corners of
        different pixels) and keeps the reference. Rounding the values to bfloat16/float16 is monotone, so it can
        only tie: a later class that ties loses (argmax keeps the first maximum) and needs no more margin, an
        earlier one wins a tie and needs the reference's rounding step on top (``TIE``: at most 2^-7 / 2^-10 of
        its largest corner)."""
        r00, r01, r10, r11 = _corners(image, best_class * stride_k, o00, o01, o10, o11, True)
        large = tl.maximum(tl.maximum(tl.abs(r00), tl.abs(r01)), tl.maximum(tl.abs(r10), tl.abs(r11)))
        reach = slack + (MARGIN * large + 9.5367431640625e-07)
        reach = -tl.where(k < best_class, reach + TIE * large, reach)
        return (v00 - r00 >= reach) | (v01 - r01 >= reach) | (v10 - r10 >= reach) | (v11 - r11 >= reach)

    @triton.jit
    def _cell_candidates(logits, candidates, counts, K, h, w, stride_b, stride_k, stride_y, stride_x,
                         MARGIN: tl.constexpr, LARGE: tl.constexpr, CELLS: tl.constexpr, CLASSES: tl.constexpr):
        # [CELLS, CLASSES] tiles: a few iterations over K instead of a chain of K dependent loads per cell
        b = tl.program_id(1).to(tl.int64)
        cell = tl.program_id(0) * CELLS + tl.arange(0, CELLS)
        ok = cell < h * w
        y0 = cell // w
        x0 = cell % w
        y1 = y0 + (y0 < h - 1).to(tl.int32)
        x1 = x0 + (x0 < w - 1).to(tl.int32)
        image = logits + b * stride_b
        o00 = (y0 * stride_y + x0 * stride_x)[:, None]
        o01 = (y0 * stride_y + x1 * stride_x)[:, None]
        o10 = (y1 * stride_y + x0 * stride_x)[:, None]
        o11 = (y1 * stride_y + x1 * stride_x)[:, None]
        # pass 1: the largest lower bound over classes (the winner's value is at least this) and unbounded cells
        floor = tl.full([CELLS], float("-inf"), tl.float32)
        unbounded = tl.zeros([CELLS], tl.int32)
        for start in range(0, K, CLASSES):
            k = start + tl.arange(0, CLASSES)[None, :]
            live = ok[:, None] & (k < K)
            v00, v01, v10, v11 = _corners(image, k * stride_k, o00, o01, o10, o11, live)
            low, high, finite, slack = _class_bounds(v00, v01, v10, v11, MARGIN, LARGE)
            floor = tl.maximum(floor, tl.max(tl.where(live, low, float("-inf")), axis=1))
            unbounded = tl.maximum(unbounded, tl.max((live & ~finite).to(tl.int32), axis=1))
        # pass 2: the classes whose upper bound reaches it, appended in increasing order
        n = tl.zeros([CELLS], tl.int32)
        out = (candidates + b * h * w * K + cell * K)[:, None]
        for start in range(0, K, CLASSES):
            k = start + tl.arange(0, CLASSES)[None, :]
            live = ok[:, None] & (k < K)
            v00, v01, v10, v11 = _corners(image, k * stride_k, o00, o01, o10, o11, live)
            low, high, finite, slack = _class_bounds(v00, v01, v10, v11, MARGIN, LARGE)
            keep = (live & ((unbounded[:, None] > 0) | (high >= floor[:, None]))).to(tl.int32)
            slot = n[:, None] + tl.cumsum(keep, axis=1) - keep
            tl.store(out + slot, k + tl.zeros([CELLS, CLASSES], tl.int32), mask=keep > 0)
            n += tl.sum(keep, axis=1)
        tl.store(counts + b * h * w + cell, n, mask=ok)

    @triton.jit
    def _source_axis(dst, n_in, scale):
        """PyTorch's source index along one axis (align_corners=False): the two source rows/cols and weights."""
        # float32 throughout (torch.compile may hand the scale over as a float64 scalar; it holds a float32 value)
        src = tl.maximum(tl.fma(dst.to(tl.float32) + 0.5, tl.cast(scale, tl.float32), -0.5), 0.0)
        i0 = src.to(tl.int32)
        i1 = i0 + (i0 < n_in - 1).to(tl.int32)
        l1 = src - i0.to(tl.float32)
        return i0, i1, 1.0 - l1, l1

    @triton.jit
    def _bilinear(v00, v01, v10, v11, ly0, ly1, lx0, lx1, TOP_W1_FUSED: tl.constexpr):
        """The interpolated value in float32, with the fma order of PyTorch's CUDA kernel (module docstring)."""
        if TOP_W1_FUSED:
            top = tl.fma(lx1, v01, lx0 * v00)
        else:
            top = tl.fma(lx0, v00, lx1 * v01)
        bottom = tl.fma(lx0, v10, lx1 * v11)
        return tl.fma(ly0, top, ly1 * bottom)

    @triton.jit
    def _round_to_input(value, ROUNDING: tl.constexpr):
        """``interpolate``'s output dtype: 1 bfloat16, 2 float16 (to nearest even), 0 float32 (as is)."""
        if ROUNDING == 1:
            # on the bits: exact on the GPU and in the interpreter (whose bfloat16 cast truncates); NaN kept
            bits = value.to(tl.int32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            value = tl.where(value == value, rounded, value)
        elif ROUNDING == 2:
            value = value.to(tl.float16).to(tl.float32)
        return value

    @triton.jit
    def _upsample_argmax(logits, candidates, counts, labels, K, h, w, H, W, stride_b, stride_k, stride_y, stride_x,
                         scale_h, scale_w, TOP_W1_FUSED: tl.constexpr, ROUNDING: tl.constexpr,
                         TILE_H: tl.constexpr, TILE_W: tl.constexpr):
        b = tl.program_id(2).to(tl.int64)
        y = tl.program_id(1) * TILE_H + tl.arange(0, TILE_H)[:, None]
        x = tl.program_id(0) * TILE_W + tl.arange(0, TILE_W)[None, :]
        ok = (y < H) & (x < W)
        y0, y1, ly0, ly1 = _source_axis(y, h, scale_h)
        x0, x1, lx0, lx1 = _source_axis(x, w, scale_w)
        cell = y0 * w + x0
        n = tl.load(counts + b * h * w + cell, mask=ok, other=0)
        cell_classes = candidates + b * h * w * K
        image = logits + b * stride_b
        # int32 offsets from one base pointer per image: half the registers of a pointer per corner
        o00 = y0 * stride_y + x0 * stride_x
        o01 = y0 * stride_y + x1 * stride_x
        o10 = y1 * stride_y + x0 * stride_x
        o11 = y1 * stride_y + x1 * stride_x
        cell_k = cell * K
        best = tl.full([TILE_H, TILE_W], float("-inf"), tl.float32)
        best_k = tl.zeros([TILE_H, TILE_W], tl.int32)
        for c in range(tl.max(n)):
            live = c < n
            k = tl.load(cell_classes + (cell_k + c), mask=live, other=0).to(tl.int32)
            v00, v01, v10, v11 = _corners(image, k * stride_k, o00, o01, o10, o11, live)
            value = _round_to_input(_bilinear(v00, v01, v10, v11, ly0, ly1, lx0, lx1, TOP_W1_FUSED), ROUNDING)
            # candidates come in increasing class order: strictly greater keeps the first maximum; NaN beats numbers
            better = live & ((value > best) | ((value != value) & (best == best)))
            best = tl.where(better, value, best)
            best_k = tl.where(better, k, best_k)
        tl.store(labels + b * H * W + y * W + x, best_k.to(tl.int64), mask=ok)

    @triton.jit
    def _argmax_of_kept(image, k, keep, o00, o01, o10, o11, stride_k, ly0, ly1, lx0, lx1, best, best_k,
                        TOP_W1_FUSED: tl.constexpr, ROUNDING: tl.constexpr):
        """Fold the kept classes of one class tile (in increasing order) into the block's running argmax: each class
        id read out of the registers by a one-hot sum, its four corners re-read (cache hits) as scalars."""
        rank = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        for j in range(tl.sum(keep.to(tl.int32), axis=0)):
            kj = tl.sum(tl.where(keep & (rank == j), k, 0), axis=0)
            c00, c01, c10, c11 = _corners(image, kj * stride_k, o00, o01, o10, o11, True)
            value = _round_to_input(_bilinear(c00, c01, c10, c11, ly0, ly1, lx0, lx1, TOP_W1_FUSED), ROUNDING)
            better = (value > best) | ((value != value) & (best == best))
            best = tl.where(better, value, best)
            best_k = tl.where(better, kj, best_k)
        return best, best_k

    @triton.jit
    def _upsample_argmax_cells(logits, labels, K, h, w, H, W, stride_b, stride_k, stride_y, stride_x, scale_h,
                               scale_w, MARGIN: tl.constexpr, TIE: tl.constexpr, LARGE: tl.constexpr,
                               FACTOR_H: tl.constexpr,
                               FACTOR_W: tl.constexpr, CLASSES: tl.constexpr, ONE_TILE: tl.constexpr,
                               TOP_W1_FUSED: tl.constexpr, ROUNDING: tl.constexpr):
        # one program per block of output pixels that all interpolate source cell (cy, cx) (module docstring, 3.)
        tile = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        ty = tile // (w + 1)
        tx = tile % (w + 1)
        cy = tl.maximum(ty - 1, 0)
        cx = tl.maximum(tx - 1, 0)
        cy1 = cy + (cy < h - 1).to(tl.int32)
        cx1 = cx + (cx < w - 1).to(tl.int32)
        image = logits + b * stride_b
        o00, o01 = cy * stride_y + cx * stride_x, cy * stride_y + cx1 * stride_x
        o10, o11 = cy1 * stride_y + cx * stride_x, cy1 * stride_y + cx1 * stride_x
        y = ty * FACTOR_H - FACTOR_H // 2 + tl.arange(0, FACTOR_H)[:, None]
        x = tx * FACTOR_W - FACTOR_W // 2 + tl.arange(0, FACTOR_W)[None, :]
        ok = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        row0, row1, ly0, ly1 = _source_axis(tl.maximum(y, 0), h, scale_h)  # rows: (cy, cy1) on the block
        col0, col1, lx0, lx1 = _source_axis(tl.maximum(x, 0), w, scale_w)
        best = tl.full([FACTOR_H, FACTOR_W], float("-inf"), tl.float32)
        best_k = tl.zeros([FACTOR_H, FACTOR_W], tl.int32)
        if ONE_TILE:  # K <= CLASSES: the corners are read once for the bounds and the candidates
            k = tl.arange(0, CLASSES)
            live = k < K
            v00, v01, v10, v11 = _corners(image, k * stride_k, o00, o01, o10, o11, live)
            low, high, finite, slack = _class_bounds(v00, v01, v10, v11, MARGIN, LARGE)
            best_class = tl.argmax(tl.where(live, low, float("-inf")), axis=0)
            unbounded = tl.max((live & ~finite).to(tl.int32), axis=0)
            keep = live & ((unbounded > 0) | _may_beat(image, k, v00, v01, v10, v11, slack, best_class, o00, o01,
                                                       o10, o11, stride_k, MARGIN, TIE))
            if tl.sum(keep.to(tl.int32), axis=0) == 1:
                # the reference class is always kept; alone, it wins at every pixel of the block (every other class
                # stays below it), so no value needs interpolating
                best_k += best_class
            else:
                best, best_k = _argmax_of_kept(image, k, keep, o00, o01, o10, o11, stride_k, ly0, ly1, lx0, lx1,
                                               best, best_k, TOP_W1_FUSED, ROUNDING)
        else:  # the class with the cell's largest lower bound over all tiles first, then the candidates
            floor = tl.full([], float("-inf"), tl.float32)
            best_class = tl.full([], 0, tl.int32)
            unbounded = tl.full([], 0, tl.int32)
            for start in range(0, K, CLASSES):
                k = start + tl.arange(0, CLASSES)
                live = k < K
                v00, v01, v10, v11 = _corners(image, k * stride_k, o00, o01, o10, o11, live)
                low, high, finite, slack = _class_bounds(v00, v01, v10, v11, MARGIN, LARGE)
                low = tl.where(live, low, float("-inf"))
                tile_floor = tl.max(low, axis=0)
                best_class = tl.where(tile_floor > floor, start + tl.argmax(low, axis=0), best_class)
                floor = tl.maximum(floor, tile_floor)
                unbounded = tl.maximum(unbounded, tl.max((live & ~finite).to(tl.int32), axis=0))
            for start in range(0, K, CLASSES):
                k = start + tl.arange(0, CLASSES)
                live = k < K
                v00, v01, v10, v11 = _corners(image, k * stride_k, o00, o01, o10, o11, live)
                low, high, finite, slack = _class_bounds(v00, v01, v10, v11, MARGIN, LARGE)
                keep = live & ((unbounded > 0) | _may_beat(image, k, v00, v01, v10, v11, slack, best_class, o00,
                                                           o01, o10, o11, stride_k, MARGIN, TIE))
                best, best_k = _argmax_of_kept(image, k, keep, o00, o01, o10, o11, stride_k, ly0, ly1, lx0, lx1,
                                               best, best_k, TOP_W1_FUSED, ROUNDING)
        tl.store(labels + b * H * W + y * W + x, best_k.to(tl.int64), mask=ok)

    @triton.jit
    def _upsample_bilinear(src, dst, K, h, w, H, W, s_b, s_k, s_y, s_x, scale_h, scale_w,
                           TOP_W1_FUSED: tl.constexpr, ROUNDING: tl.constexpr, TILE_H: tl.constexpr,
                           TILE_W: tl.constexpr):
        # [TILE_H, TILE_W] tiles of one class plane of the NCHW output: contiguous, vectorised stores whatever
        # the input's layout (a channels-last output, 150 classes apart per pixel, writes at a third of the speed)
        b = (tl.program_id(0) // K).to(tl.int64)
        k = tl.program_id(0) % K
        y = (tl.program_id(1) * TILE_H + tl.arange(0, TILE_H))[:, None]
        x = (tl.program_id(2) * TILE_W + tl.arange(0, TILE_W))[None, :]
        ok = (y < H) & (x < W)
        y0, y1, ly0, ly1 = _source_axis(y, h, scale_h)
        x0, x1, lx0, lx1 = _source_axis(x, w, scale_w)
        image = src + b * s_b + k * s_k
        v00, v01, v10, v11 = _corners(image, 0, y0 * s_y + x0 * s_x, y0 * s_y + x1 * s_x, y1 * s_y + x0 * s_x,
                                      y1 * s_y + x1 * s_x, ok)
        value = _round_to_input(_bilinear(v00, v01, v10, v11, ly0, ly1, lx0, lx1, TOP_W1_FUSED), ROUNDING)
        plane = dst + (b * K + k) * H * W
        tl.store(plane + (y * W + x), value.to(dst.dtype.element_ty), mask=ok)


def _pytorch_scales(h: int, w: int, height: int, width: int) -> Tuple[float, float]:
    """PyTorch's scales: float32 in / out (accscalar_t), passed to the kernels as that float32 value."""
    return ((torch.tensor(h, dtype=torch.float32) / height).item(),
            (torch.tensor(w, dtype=torch.float32) / width).item())


def _nhwc_top_row(logits: Tensor) -> bool:
    """Whether CUDA's ``interpolate`` runs the float32 NHWC kernel, whose top row fuses the other product."""
    return logits.dtype == torch.float32 and logits.shape[1] >= 16 and _suggests_channels_last(logits)


def _check_int32_offsets(logits: Tensor, out_elements: int, name: str) -> None:
    """The kernels index within one image in int32: its logits (and candidate lists) and its outputs must fit."""
    span = sum((n - 1) * s for n, s in zip(logits.shape[1:], logits.stride()[1:]))
    if max(logits[0].numel(), out_elements, span) >= 1 << 31:
        raise ValueError(f"{name}: one image's logits or outputs exceed int32 offsets ({tuple(logits.shape)}, "
                         f"{out_elements} outputs)")


def upsample_bilinear_triton(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """``F.interpolate(logits, size, mode="bilinear", align_corners=False)``'s values with the CUDA kernel's exact
    arithmetic (that of its NHWC kernel for channels-last input), written as a contiguous NCHW tensor in one
    memory-bound pass."""
    if triton is None:
        raise RuntimeError("upsample_bilinear impl='triton' needs triton")
    if logits.dtype not in _ROUNDING:
        raise ValueError(f"upsample_bilinear: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    b, k, h, w = logits.shape
    height, width = size
    out = torch.empty(b, k, height, width, dtype=logits.dtype, device=logits.device)
    if (h, w) == (height, width):
        return out.copy_(logits)  # PyTorch copies too
    _check_int32_offsets(logits, k * height * width, "upsample_bilinear")
    # On the GPU the store's cast rounds to nearest even, as PyTorch's; the interpreter's truncates: round first.
    rounding = _ROUNDING[logits.dtype] if os.environ.get("TRITON_INTERPRET") == "1" else 0
    grid = (b * k, triton.cdiv(height, _UPSAMPLE_TILE[0]), triton.cdiv(width, _UPSAMPLE_TILE[1]))
    _upsample_bilinear[grid](logits, out, k, h, w, height, width, *logits.stride(),
                             *_pytorch_scales(h, w, height, width), TOP_W1_FUSED=_nhwc_top_row(logits),
                             ROUNDING=rounding, TILE_H=_UPSAMPLE_TILE[0], TILE_W=_UPSAMPLE_TILE[1],
                             num_warps=_UPSAMPLE_TILE[2])
    return out


def upsample_bilinear(logits: Tensor, size: Tuple[int, int], *, impl: str = "auto") -> Tensor:
    """``F.interpolate(logits, size, mode="bilinear", align_corners=False)``, bit-identical values; on CUDA one Triton
    pass near the memory bandwidth, always into a contiguous NCHW tensor (PyTorch's NHWC kernel, which the Segmenter
    head's channels-last logits take, runs at ~15% of the bandwidth; its output is channels-last).
    ``impl``: "auto" (Triton for CUDA float32/bfloat16/float16 when importable), "reference" or "triton"."""
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"upsample_bilinear impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    if logits.dim() != 4:
        raise ValueError(f"upsample_bilinear: logits must be [B, K, h, w], got shape {tuple(logits.shape)}")
    size = (int(size[0]), int(size[1]))
    if impl == "triton" or (impl == "auto" and logits.is_cuda and triton is not None and logits.dtype in _ROUNDING
                            and logits.numel() > 0 and not torch.jit.is_tracing()):
        return upsample_bilinear_triton(logits, size)
    return _interpolate(logits, size)


def _cell_factors(h: int, w: int, height: int, width: int) -> Optional[Tuple[int, int]]:
    """The integer upsampling factors when both are powers of two of at least ``_MIN_CELL_FACTOR`` (then
    ``_upsample_argmax_cells`` applies: every factor × factor block, offset by half a factor, reads one cell), else
    None."""
    factors = (height // h, width // w)
    if (factors[0] * h, factors[1] * w) != (height, width):
        return None
    if all(f >= _MIN_CELL_FACTOR and f & (f - 1) == 0 for f in factors):
        return factors
    return None


def upsample_argmax_triton(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """The kernels of the module docstring; any strides, float32 / bfloat16 / float16."""
    if triton is None:
        raise RuntimeError("upsample_argmax impl='triton' needs triton")
    if logits.dtype not in _ROUNDING:
        raise ValueError(f"upsample_argmax: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    b, k, h, w = logits.shape
    height, width = size
    if (h, w) == (height, width):
        return logits.argmax(1)
    strides = logits.stride()
    _check_int32_offsets(logits, height * width, "upsample_argmax")
    labels = torch.empty(b, height, width, dtype=torch.long, device=logits.device)
    factors = _cell_factors(h, w, height, width)
    if factors is not None:
        classes = min(triton.next_power_of_2(k), _CELL_CLASSES)
        _upsample_argmax_cells[((h + 1) * (w + 1), b)](
            logits, labels, k, h, w, height, width, *strides, *_pytorch_scales(h, w, height, width),
            MARGIN=_MARGIN[torch.float32], TIE=_TIE[logits.dtype], LARGE=_LARGE[logits.dtype], FACTOR_H=factors[0],
            FACTOR_W=factors[1],
            CLASSES=classes, ONE_TILE=k <= classes, TOP_W1_FUSED=_nhwc_top_row(logits), ROUNDING=_ROUNDING[logits.dtype],
            num_warps=max(1, min(8, factors[0] * factors[1] // _CELL_PIXELS_PER_WARP)))
        return labels
    candidates = torch.empty(b, h * w, k, dtype=torch.int16 if k <= 1 << 15 else torch.int32, device=logits.device)
    counts = torch.empty(b, h * w, dtype=torch.int32, device=logits.device)
    _cell_candidates[(triton.cdiv(h * w, _CELLS), b)](
        logits, candidates, counts, k, h, w, *strides,
        MARGIN=_MARGIN[logits.dtype], LARGE=_LARGE[logits.dtype], CELLS=_CELLS, CLASSES=_CLASSES, num_warps=4)
    _upsample_argmax[(triton.cdiv(width, _TILE_W), triton.cdiv(height, _TILE_H), b)](
        logits, candidates, counts, labels, k, h, w, height, width, *strides, *_pytorch_scales(h, w, height, width),
        TOP_W1_FUSED=_nhwc_top_row(logits), ROUNDING=_ROUNDING[logits.dtype], TILE_H=_TILE_H, TILE_W=_TILE_W, num_warps=4)
    return labels


def upsample_argmax(logits: Tensor, size: Tuple[int, int], *, impl: str = "auto") -> Tensor:
    """``F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(1)`` → ``[B, H, W]`` long, without
    the full-resolution logits. ``impl``: "auto" (Triton on CUDA when importable, else the reference),
    "reference" (the expression in memory-bounded chunks) or "triton"."""
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"upsample_argmax impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    if logits.dim() != 4:
        raise ValueError(f"upsample_argmax: logits must be [B, K, h, w], got shape {tuple(logits.shape)}")
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"upsample_argmax: size must be positive, got {size}")
    if logits.shape[0] == 0:
        return torch.empty(0, *size, dtype=torch.long, device=logits.device)
    if impl == "triton" or (impl == "auto" and logits.is_cuda and triton is not None and not torch.jit.is_tracing()):
        return upsample_argmax_triton(logits, size)
    return upsample_argmax_reference(logits, size)
