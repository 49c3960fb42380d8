"""torch.compile on the ALGM wrapper: fixed merge levels trace as one graph (CUDA-graph-able); data-dependent
thresholds break the graph exactly at their host sync and still give the eager outputs."""
from __future__ import annotations

import timm
import torch
from torch._dynamo.utils import counters

from algm_d2 import ALGMConfig, apply_algm
from algm_d2.merge import FixedLevel
from algm_d2.modeling import build_model
from algm_d2.config import get_cfg


def tiny_wrapper(algm: ALGMConfig):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, embed_dim=48,
                            depth=4, num_heads=3)
    return apply_algm(vit, algm).eval()


FIXED = ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(fraction=0.5),
                   global_threshold=FixedLevel(fraction=0.4))


def test_fixed_levels_compile_as_one_graph():
    model = tiny_wrapper(FIXED)
    images = torch.randn(2, 3, 64, 96)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        tokens, state = compiled(images)
        expected, _ = model(images)
    torch.testing.assert_close(tokens, expected)
    assert state.tokens_per_layer()[-1] == [13, 13]


def test_thresholds_break_the_graph_only_at_their_host_syncs():
    model = tiny_wrapper(ALGMConfig(local_layer=1, global_layer=3, batch_policy="per_image", local_threshold=0.2))
    images = torch.randn(2, 3, 64, 96)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        tokens, _ = compiled(images)
        expected, _ = model(images)
    torch.testing.assert_close(tokens, expected)
    reasons = counters["graph_break"]
    assert reasons and all("_local_scalar_dense" in reason or "tolist" in reason for reason in reasons)


def test_segmenter_with_fixed_levels_compiles_as_one_graph():
    cfg = get_cfg()
    cfg.merge_from_file("configs/demo/segmenter_tiny_algm.yaml")
    cfg.merge_from_list(["MODEL.ALGM.LOCAL_THRESHOLD", "fraction:0.25", "MODEL.ALGM.GLOBAL_THRESHOLD", "top:8"])
    net = build_model(cfg).net.eval()
    images = torch.randn(2, 3, 128, 96)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(net, backend="eager", fullgraph=True)(images)
        torch.testing.assert_close(logits, net(images))
