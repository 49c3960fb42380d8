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

from algm_d2.modeling.ops import upsample_argmax as module
from algm_d2.modeling.ops.upsample_argmax import upsample_argmax

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6, 16, 24), (2, 3, 5, 7, 13, 9), (2, 4, 6, 6, 4, 3), (1, 1, 3, 3, 7, 7)])
def test_chunked_reference_equals_the_plain_expression(dtype, shape, monkeypatch):
    b, k, h, w, height, width = shape
    torch.manual_seed(0)
    logits = torch.randn(b, k, h, w).to(dtype)
    monkeypatch.setattr(module, "_REFERENCE_CHUNK_ELEMENTS", k * height * width)  # one image per chunk
    expected = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(upsample_argmax(logits, (height, width)), expected)


def test_bad_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        upsample_argmax(torch.zeros(1, 2, 3, 3), (6, 6), impl="cuda")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_equals_the_reference_in_the_interpreter():
    """fp32: against F.interpolate + argmax. bf16: against PyTorch's CUDA formula evaluated step by step in float32
    and rounded to bf16 (the CPU kernel rounds differently), with exact ties from a duplicated class."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from algm_d2.modeling.ops.upsample_argmax import upsample_argmax

        def cuda_formula(x, height, width):
            b, k, h, w = x.shape
            def axis(n_out, n_in):
                scale = torch.tensor(n_in, dtype=torch.float32) / n_out
                src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
                i0 = src.to(torch.int64)
                i1 = i0 + (i0 < n_in - 1).long()
                l1 = src - i0.float()
                return i0, i1, 1 - l1, l1
            y0, y1, ly0, ly1 = axis(height, h)
            x0, x1, lx0, lx1 = axis(width, w)
            v = x.float()
            g = lambda ys, xs: v[:, :, ys][:, :, :, xs]
            ly0, ly1 = ly0[:, None], ly1[:, None]
            out = ly0 * (lx0 * g(y0, x0) + lx1 * g(y0, x1)) + ly1 * (lx0 * g(y1, x0) + lx1 * g(y1, x1))
            return out.to(x.dtype).argmax(1)

        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            for b, k, h, w, height, width in [(2, 5, 4, 6, 16, 24), (1, 3, 5, 7, 13, 9), (2, 4, 6, 6, 4, 3),
                                              (1, 1, 3, 3, 7, 7)]:
                x = torch.randn(b, k, h, w).to(dtype)
                if k > 2:
                    x[:, 2] = x[:, 1]
                got = upsample_argmax(x, (height, width), impl="triton")
                assert torch.equal(got, cuda_formula(x, height, width)), (dtype, b, k, h, w)
                if dtype == torch.float32:
                    expected = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
                    assert torch.equal(got, expected.argmax(1)), ("fp32", b, k, h, w)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


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
