"""GFLOPs of baseline Segmenter match the paper (fvcore multiply-adds, attention counted) within 2%."""
from __future__ import annotations

import pytest
import torch

from algm_d2.checkpoint import build_from_variant
from algm_d2.evaluation import count_gflops, vit_encoder_macs
from algm_d2.modeling import SEGMENTER_VARIANTS

PAPER_GFLOPS = {"tiny": (512, 12.8), "small": (512, 38.6), "base": (512, 130.0), "large": (640, 672.0)}
NUM_CLASSES = 150


def segmenter_macs(name: str, size: int, patch: int = 16) -> int:
    """Analytic fvcore-convention MACs of Segmenter with its 2-layer mask transformer (ADE20K, 150 classes)."""
    sizes = SEGMENTER_VARIANTS[name]
    c, depth, k = sizes["embed_dim"], sizes["depth"], NUM_CLASSES
    n = (size // patch) ** 2
    m = n + k  # decoder tokens: patches + class embeddings
    encoder = vit_encoder_macs(num_patches=n, embed_dim=c, depth=depth, mlp_hidden_dim=4 * c, patch_size=patch)
    decoder_blocks = 2 * (12 * m * c * c + 2 * m * m * c + 2 * 5 * m * c)  # linears, attention, two LayerNorms
    projections = n * c * c + n * c * c + k * c * c + n * k * c  # proj_dec, proj_patch, proj_classes, masks
    norms = 5 * m * c + 5 * n * k  # decoder_norm, mask_norm
    upsample = 4 * k * size * size  # fvcore's bilinear: 4 per output element
    return encoder + decoder_blocks + projections + norms + upsample


def build(name: str, size: int):
    sizes = SEGMENTER_VARIANTS[name]
    variant = {"net_kwargs": {"image_size": size, "patch_size": 16, "d_model": sizes["embed_dim"],
                              "n_heads": sizes["num_heads"], "n_layers": sizes["depth"], "n_cls": NUM_CLASSES,
                              "decoder": {"name": "mask_transformer", "n_layers": 2}}}
    return build_from_variant(variant).eval()


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_counted_gflops_match_the_paper(name):
    size, paper = PAPER_GFLOPS[name]
    result = count_gflops(build(name, size), (torch.randn(1, 3, size, size),))
    assert not result["unsupported_ops"]
    assert result["macs"] == segmenter_macs(name, size)
    assert abs(result["gflops"] - paper) / paper < 0.02


@pytest.mark.parametrize("name", ["base", "large"])
def test_analytic_gflops_match_the_paper(name):
    size, paper = PAPER_GFLOPS[name]
    assert abs(segmenter_macs(name, size) / 1e9 - paper) / paper < 0.02
