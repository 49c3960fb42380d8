"""The Segmenter benchmark front-end (algm_d2.evaluation.benchmark)."""
from __future__ import annotations

import torch

from algm_d2.merge import OFF


def test_the_benchmark_gives_the_model_its_own_graph_setting_back():
    from algm_d2.checkpoint import build_from_variant
    from algm_d2.evaluation.benchmark import benchmark_net

    torch.manual_seed(0)
    net = build_from_variant({"net_kwargs": {"image_size": 64, "patch_size": 16, "d_model": 48, "n_heads": 3,
                                             "n_layers": 2, "n_cls": 5, "decoder": {"name": "linear"}}}).eval()
    net.backbone.use_cuda_graphs(True, capture=False)
    own = net.backbone.block_graphs
    benchmark_net(net, torch.randn(2, 3, 64, 64), settings={"baseline": OFF}, batch_size=2, precision="fp32",
                  warmup=1, iters=1, rounds=1, latency=False, flops_images=0)
    assert net.backbone.block_graphs is own
