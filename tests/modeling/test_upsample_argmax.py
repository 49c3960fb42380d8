"""The fused decode tail: upsample + argmax without the full-resolution logits, identical labels."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from algm_d2.modeling.ops.upsample_argmax import _suggests_channels_last, upsample_argmax, upsample_argmax_reference

ROOT = Path(__file__).resolve().parents[2]

# (B, K, h, w, H, W): integer and non-integer upsampling, downsampling, mixed, one class
SHAPES = [(3, 5, 4, 6, 16, 24), (2, 3, 5, 7, 13, 9), (2, 4, 6, 6, 4, 3), (2, 6, 5, 3, 3, 11), (1, 1, 3, 3, 7, 7)]


def _plain(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_reference_equals_the_plain_expression(dtype, shape):
    b, k, h, w, height, width = shape
    torch.manual_seed(0)
    logits = torch.randn(b, k, h, w).to(dtype)
    if k > 2:
        logits[:, 2] = logits[:, 1]  # exact ties: the first class wins
    expected = _plain(logits, (height, width))
    assert torch.equal(upsample_argmax(logits, (height, width)), expected)  # auto on CPU: the reference
    one_image = k * height * width
    assert torch.equal(upsample_argmax_reference(logits, (height, width), chunk_elements=one_image), expected)
    assert torch.equal(upsample_argmax_reference(logits, (height, width), chunk_elements=2 * one_image - 1),
                       expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_in_class_chunks_keeps_argmax_rules(dtype, channels_last):
    """An image larger than the chunk goes in class chunks of 64: first maximum and first NaN across chunks."""
    torch.manual_seed(0)
    logits = torch.randn(2, 150, 3, 4)
    logits[:, 100] = logits[:, 7]  # a tie across chunks: class 7 wins
    logits[0, 120, 1, 1] = float("nan")  # NaN beats numbers
    logits[1, 130, 2, 2] = float("nan")
    logits[1, 140, 2, 2] = float("nan")  # the first NaN wins
    logits[1, 10, 0, 0] = float("inf")
    logits = logits.to(dtype)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    size = (7, 9)
    got = upsample_argmax_reference(logits, size, chunk_elements=64 * 63)  # chunks [0, 64), [64, 150)
    assert torch.equal(got, _plain(logits, size))
    got = upsample_argmax_reference(logits, size, chunk_elements=1)  # the smallest chunks: 64 classes
    assert torch.equal(got, _plain(logits, size))


def test_arguments_are_checked_and_empty_batches_pass():
    with pytest.raises(ValueError, match="impl"):
        upsample_argmax(torch.zeros(1, 2, 3, 3), (6, 6), impl="cuda")
    with pytest.raises(ValueError, match="B, K, h, w"):
        upsample_argmax(torch.zeros(2, 3, 3), (6, 6))
    with pytest.raises(ValueError, match="positive"):
        upsample_argmax(torch.zeros(1, 2, 3, 3), (0, 6))
    assert upsample_argmax(torch.zeros(0, 2, 3, 3), (6, 5)).shape == (0, 6, 5)


def test_channels_last_detection_matches_torch():
    """Which of PyTorch's CUDA kernels (NCHW or NHWC, different roundings) ``interpolate`` would run."""
    suggest = pytest.importorskip("torch._prims_common").suggest_memory_format
    base = torch.randn(2, 20, 5, 6)
    tensors = [base, base.contiguous(memory_format=torch.channels_last), base.permute(0, 1, 3, 2),
               base.contiguous(memory_format=torch.channels_last)[:, 3:17], base[:, :, 1:4],
               torch.randn(2, 6, 20).transpose(1, 2).reshape(2, 20, 2, 3),  # the Segmenter head's grid
               torch.randn(2, 20, 1, 1), torch.randn(1, 1, 1, 5), torch.randn(2, 1, 4, 4)[:, :, ::2],
               torch.randn(3, 4, 1, 6).permute(0, 3, 2, 1)]
    for t in tensors:
        assert _suggests_channels_last(t) == (suggest(t) == torch.channels_last), (t.shape, t.stride())


# Runs under TRITON_INTERPRET=1 (set before triton decorates the kernels, hence a fresh interpreter). The
# interpreter evaluates tl.fma as x * y + z in float32 (two roundings): it is patched to round once, as the GPU
# does. `cuda_labels` is PyTorch's CUDA arithmetic written with tensor ops (float64 products and sums are exact
# before the one rounding to float32, up to a double rounding too rare to matter here).
_INTERPRETER_SCRIPT = textwrap.dedent("""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import triton.runtime.interpreter as interpreter

    def _fma(self, x, y, z):
        exact = x.data.astype(np.float64) * y.data + z.data
        return interpreter.TensorHandle(exact.astype(np.float32), z.dtype.scalar)

    interpreter.InterpreterBuilder.create_fma = _fma

    from algm_d2.modeling.ops import upsample_argmax as ops

    def fma(a, b, c):
        return (a.double() * b.double() + c.double()).float()

    def axis(n_out, n_in):
        scale = torch.tensor(n_in, dtype=torch.float32) / n_out
        dst = torch.arange(n_out, dtype=torch.float32) + 0.5
        src = fma(dst, scale.expand(n_out), torch.full((n_out,), -0.5)).clamp(min=0)
        i0 = src.long()
        l1 = src - i0.float()
        return i0, i0 + (i0 < n_in - 1).long(), 1 - l1, l1

    def cuda_values(x, size):
        b, k, h, w = x.shape
        if (h, w) == size:
            return x.clone()  # interpolate copies
        y0, y1, ly0, ly1 = axis(size[0], h)
        x0, x1, lx0, lx1 = axis(size[1], w)
        v = x.float()
        g = lambda ys, xs: v[:, :, ys][:, :, :, xs]
        ly0, ly1 = ly0[:, None], ly1[:, None]
        if x.dtype == torch.float32 and k >= 16 and x.is_contiguous(memory_format=torch.channels_last):
            top = fma(lx1, g(y0, x1), lx0 * g(y0, x0))  # the NHWC float32 kernel
        else:
            top = fma(lx0, g(y0, x0), lx1 * g(y0, x1))
        bottom = fma(lx0, g(y1, x0), lx1 * g(y1, x1))
        return fma(ly0, top, ly1 * bottom).to(x.dtype)

    def cuda_labels(x, size):
        return cuda_values(x, size).argmax(1)

    def near_ties(k, h, w, dtype):
        # every class 0-2 ulps (of its dtype) from class 0: the labels fingerprint every rounding
        x = torch.randn(1, 1, h, w).to(dtype).expand(1, k, h, w).clone()
        for step in torch.randint(-1, 2, (2, 1, k, h, w)):
            x = torch.where(step == 0, x, torch.nextafter(x, torch.where(step > 0, float("inf"), float("-inf"))
                                                          .to(dtype)))
        return x

    def smooth(b, k, h, w):
        return torch.randn(b, k, h, w) + 4 * torch.randn(b, k, 1, 1)

    torch.manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for b, k, h, w, height, width in [(2, 5, 4, 6, 16, 24), (1, 3, 5, 7, 13, 9), (2, 4, 6, 6, 4, 3),
                                          (1, 1, 3, 3, 7, 7)]:
            x = torch.randn(b, k, h, w).to(dtype)
            if k > 2:
                x[:, 2] = x[:, 1]  # exact ties
            cases.append((x, (height, width), True))
        cases.append((smooth(2, 20, 4, 5).to(dtype), (12, 17), True))
        # power-of-two factors ≥ 8: the one-kernel path (_upsample_argmax_cells), smooth and random, both layouts
        cases.append((smooth(2, 20, 3, 2).to(dtype), (24, 16), True))
        cases.append((smooth(1, 20, 2, 3).to(dtype).contiguous(memory_format=torch.channels_last), (32, 24), True))
        cases.append((torch.randn(2, 5, 2, 3).to(dtype), (16, 48), True))
        cases.append((smooth(2, 20, 4, 5).to(dtype).contiguous(memory_format=torch.channels_last), (12, 17), True))
    # float16: the rounding step of the one-kernel path's tie margin
    cases.append((near_ties(12, 6, 6, torch.float16), (48, 48), False))
    cases.append((near_ties(16, 2, 3, torch.float16).contiguous(memory_format=torch.channels_last), (16, 24), False))
    for dtype in (torch.float32, torch.bfloat16):
        for k, h, w, height, width in [(16, 3, 4, 10, 9), (2, 9, 9, 23, 20)]:
            cases.append((near_ties(k, h, w, dtype), (height, width), False))
            cases.append((near_ties(k, h, w, dtype).contiguous(memory_format=torch.channels_last), (height, width),
                          False))
        cases.append((near_ties(16, 2, 3, dtype).contiguous(memory_format=torch.channels_last), (16, 24), False))
        # classes a few ulps below another at all four corners of a cell, which rounding can still tie
        cases.append((near_ties(12, 6, 6, dtype), (48, 48), False))
        x = torch.randn(2, 4, 4, 5)
        x[0, 1, 1, 2], x[0, 3, 2, 2], x[1, 2, 0, 0] = float("nan"), float("nan"), float("nan")
        x[0, 0, 3, 4], x[1, 1, 2, 3], x[1, 3, 2, 4] = float("inf"), float("-inf"), float("inf")
        cases.append((x.to(dtype), (9, 11), False))  # NaN, and NaN from 0 * inf and inf - inf
        cases.append((x.to(dtype), (4, 5), False))  # same size: a copy, inf stays inf
        cases.append((x.to(dtype), (32, 40), False))  # the same non-finite values on the one-kernel path
    assert ops._cell_factors(2, 3, 16, 48) == (8, 16) and ops._cell_factors(4, 6, 16, 24) is None
    assert ops._cell_factors(3, 3, 24, 36) is None and ops._cell_factors(4, 4, 64, 60) is None
    for i, (x, size, random) in enumerate(cases):
        got = ops.upsample_argmax(x, size, impl="triton")
        assert torch.equal(got, cuda_labels(x, size)), (i, x.dtype, tuple(x.shape), size)
        values = ops.upsample_bilinear(x, size, impl="triton")
        torch.testing.assert_close(values, cuda_values(x, size), rtol=0, atol=0, equal_nan=True)
        assert values.is_contiguous(), i  # NCHW whatever the input's layout
        if random and x.dtype == torch.float32:  # no near ties: the CPU kernel's roundings agree
            assert torch.equal(got, F.interpolate(x, size=size, mode="bilinear", align_corners=False).argmax(1)), i

    # the one-kernel path visiting the classes in several register tiles
    ops._CELL_CLASSES = 8
    for i, (x, size, _) in enumerate(cases):
        if ops._cell_factors(*x.shape[2:], *size) is not None:
            assert torch.equal(ops.upsample_argmax(x, size, impl="triton"), cuda_labels(x, size)), ("chunks", i)

    # pruning: smooth logits leave few candidates, in increasing order, including every pixel's winner
    x = smooth(2, 20, 4, 5)
    b, k, h, w = x.shape
    candidates = torch.empty(b, h * w, k, dtype=torch.int16)
    counts = torch.empty(b, h * w, dtype=torch.int32)
    ops._cell_candidates[(1, b)](x, candidates, counts, k, h, w, *x.stride(), MARGIN=ops._MARGIN[x.dtype],
                                 LARGE=ops._LARGE[x.dtype], CELLS=32, CLASSES=8)
    assert counts.float().mean() < 4, counts
    labels = cuda_labels(x, (15, 22))
    cells = axis(15, h)[0][:, None] * w + axis(22, w)[0][None, :]
    for i in range(b):
        for cell in range(h * w):
            kept = candidates[i, cell, :counts[i, cell]].long()
            assert (kept.diff() > 0).all(), kept
            pixels = cells == cell
            assert torch.isin(labels[i][pixels], kept).all(), (i, cell)
    print("ok", len(cases))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_reproduce_pytorch_cuda_in_the_interpreter():
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout[-2000:] + result.stderr[-4000:]


def test_segmenter_predict_labels_equals_the_argmax_of_its_logits():
    from algm_d2.config import get_cfg
    from algm_d2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs/demo/segmenter_tiny_algm.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    net = build_model(cfg).net.eval()
    images = torch.randn(2, 3, 100, 72)  # padded to the patch multiple inside, cropped back
    with torch.no_grad():
        assert torch.equal(net.predict_labels(images), net(images).argmax(1))
