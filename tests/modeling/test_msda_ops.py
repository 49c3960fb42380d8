"""Multi-scale deformable attention: the PyTorch reference against a float64 loop, its gradients, and the Triton
kernels (forward and all three gradients) run on the CPU through Triton's interpreter."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from algm_d2.modeling.ops import MSDeformAttn, ms_deform_attn_reference

ROOT = Path(__file__).resolve().parents[2]


def loop_reference(value, shapes, locations, weights):
    """Float64 loops: pixel = loc·size − 0.5, four corners, zero outside the map."""
    b_, _, m_, d_ = value.shape
    _, lq, _, levels, points, _ = locations.shape
    out = torch.zeros(b_, lq, m_, d_, dtype=torch.float64)
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    for b in range(b_):
        for q in range(lq):
            for m in range(m_):
                for lv, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x = float(locations[b, q, m, lv, p, 0]) * w - 0.5
                        y = float(locations[b, q, m, lv, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi, xi in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yi < h and 0 <= xi < w:
                                corner = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                out[b, q, m] += (float(weights[b, q, m, lv, p]) * corner
                                                 * value[b, starts[lv] + yi * w + xi, m].double())
    return out.view(b_, lq, m_ * d_)


def random_inputs(shapes, heads, dim, points, queries, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(2, s, heads, dim, generator=g, dtype=dtype)
    locations = torch.rand(2, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(2, queries, heads, len(shapes), points, generator=g, dtype=dtype).softmax(-1)
    return value, locations, weights


@pytest.mark.parametrize("shapes", [[(5, 7), (3, 4), (2, 2)], [(6, 5)], [(4, 4), (2, 3)]])
def test_reference_equals_a_float64_loop(shapes):
    value, locations, weights = random_inputs(shapes, 2, 3, 2, 5, seed=len(shapes))
    out = ms_deform_attn_reference(value.double(), shapes, locations.double(), weights.double())
    torch.testing.assert_close(out, loop_reference(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)


def test_reference_gradients():
    value, locations, weights = random_inputs([(3, 4), (2, 2)], 2, 2, 2, 3, seed=0, dtype=torch.float64)
    locations = locations * 0.8 + 0.1  # keep samples off exact pixel centres' kinks
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn_reference(v, [(3, 4), (2, 2)], l, w), inputs)


def test_module_reference_and_auto_agree_on_cpu():
    torch.manual_seed(0)
    module = MSDeformAttn(embed_dims=16, num_heads=4, num_levels=2, num_points=2, value_ratio=0.5)
    shapes = [(6, 4), (3, 2)]
    query, value = torch.randn(2, 7, 16), torch.randn(2, 30, 16)
    points = torch.rand(1, 7, 1, 2)
    auto = module(query, points, value, shapes)
    module.impl = "reference"
    torch.testing.assert_close(module(query, points, value, shapes), auto)
    assert auto.shape == (2, 7, 16)
    with pytest.raises(ValueError, match="not divisible"):
        MSDeformAttn(embed_dims=16, num_heads=3, num_levels=1, num_points=1)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_equal_the_reference_in_the_interpreter():
    """TRITON_INTERPRET must be set before the kernels are decorated: run in a fresh interpreter."""
    script = textwrap.dedent("""
        import torch
        from algm_d2.modeling.ops.msda import ms_deform_attn_reference
        from algm_d2.modeling.ops.msda_triton import ms_deform_attn_triton
        torch.manual_seed(0)
        cases = [([(5, 7), (3, 4), (2, 2)], 2, 6, 2, 9), ([(6, 5)], 3, 4, 3, 20), ([(3, 3), (2, 4)], 1, 8, 1, 5)]
        for shapes, heads, dim, points, queries in cases:
            s = sum(h * w for h, w in shapes)
            value = torch.randn(2, s, heads, dim, requires_grad=True)
            loc = (torch.rand(2, queries, heads, len(shapes), points, 2) * 1.4 - 0.2).requires_grad_()
            weights = torch.rand(2, queries, heads, len(shapes), points).softmax(-1).requires_grad_()
            ref = ms_deform_attn_reference(value, shapes, loc, weights)
            out = ms_deform_attn_triton(value, shapes, loc, weights)
            grad = torch.randn_like(ref)
            expected = torch.autograd.grad(ref, (value, loc, weights), grad)
            got = torch.autograd.grad(out, (value, loc, weights), grad)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            for name, a, b in zip(("value", "locations", "weights"), got, expected):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
