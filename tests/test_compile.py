"""torch.compile on the ALGM wrapper: fixed merge levels trace as one graph (CUDA-graph-able); data-dependent
thresholds break the graph exactly at their host sync and still give the eager outputs."""
from __future__ import annotations

import pytest
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


def per_image_segmenter():
    """A tiny Segmenter (mask transformer) whose per-image merges leave a padded batch that runs packed."""
    cfg = get_cfg()
    cfg.merge_from_file("configs/demo/segmenter_tiny_algm.yaml")
    cfg.merge_from_list(["MODEL.ALGM.BATCH_POLICY", "per_image", "MODEL.ALGM.LOCAL_THRESHOLD", "0.3"])
    torch.manual_seed(0)
    return build_model(cfg).net.eval()


def test_compiled_block_halves_give_the_eager_outputs_with_one_graph_per_half():
    """``compile_blocks``: dynamic-shape graphs of the block halves serve every block and every token count (a
    second batch with other per-image counts compiles nothing new) and give the eager logits."""
    net = per_image_segmenter()
    images = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    images[1] = images[1].mean(dim=(1, 2), keepdim=True) + 0.05 * images[1]  # a flat image merges more
    batches = [images, images[[2, 1]]]
    with torch.no_grad():
        expected, counts = [], []
        for batch in batches:
            expected.append(net(batch))
            counts.append(net.merge_stats["tokens_per_layer"][-1])
        assert all(len(set(c)) > 1 for c in counts) and sum(counts[0]) != sum(counts[1])  # padded, other totals
        torch._dynamo.reset()
        counters.clear()
        net.compile_blocks("default")
        try:
            first = net(batches[0])
            graphs = counters["stats"]["unique_graphs"]
            second = net(batches[1])
            assert counters["stats"]["unique_graphs"] == graphs, "a new token count recompiled a block half"
            labels = net.predict_labels(batches[0])
        finally:
            net.compile_blocks(None)
    # attention (unmerged), packed attention (encoder and decoder head dims differ), padded and packed MLPs
    assert 3 <= graphs <= 5, dict(counters["stats"])
    torch.testing.assert_close(first, expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, expected[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(labels, expected[0].argmax(1))


def test_compiled_block_halves_refuse_cuda_graphs():
    with pytest.raises(ValueError, match="reduce-overhead"):
        per_image_segmenter().compile_blocks("reduce-overhead")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton variable-length kernel runs on CUDA only")
def test_compiled_block_halves_on_cuda_in_bf16():
    """On a GPU (CI has none): the compiled graphs call the Triton kernel through the operator; bf16 roundings of
    fused and unfused code differ, so logits agree to bf16 precision and nearly every label is the same."""
    net = per_image_segmenter().cuda()
    images = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(0)).cuda()
    images[1] = images[1].mean(dim=(1, 2), keepdim=True) + 0.05 * images[1]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = net(images).float()
        net.compile_blocks("default")
        try:
            compiled = net(images).float()
        finally:
            net.compile_blocks(None)
    torch.testing.assert_close(compiled, expected, rtol=5e-2, atol=5e-2)
    assert (compiled.argmax(1) == expected.argmax(1)).float().mean() > 0.99
