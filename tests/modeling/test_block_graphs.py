"""CUDA graphs of the segments between merges' host syncs: buckets, static buffers and replays give the eager
outputs."""
from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from algm_d2 import ALGMConfig, apply_algm
from algm_d2.merge import OFF, FixedLevel
from algm_d2.modeling.backbone.block_graphs import SEQLEN_STEP, bucket_rows, bucket_seqlen

PER_IMAGE = ALGMConfig(local_layer=1, global_layer=3, local_threshold=0.3, global_threshold="batch_stats",
                       batch_policy="per_image")
SETTINGS = {
    "per_image": PER_IMAGE,  # packed runs (bucketed)
    "batch_min": ALGMConfig(local_layer=1, global_layer=3, local_threshold=0.3, global_threshold="batch_stats",
                            batch_policy="min"),  # dense runs, counts vary per batch
    "fixed": ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(fraction=0.3),
                        global_threshold=FixedLevel(fraction=0.2)),
    "plain": OFF,  # one run of all blocks
}


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**6), st.sampled_from([1, 2, 4, 16, 64]))
def test_row_buckets_cover_the_total_with_little_waste(total, per_octave):
    rows = bucket_rows(total, per_octave)
    assert total <= rows <= max(total + 15, total + total // per_octave)
    assert bucket_rows(rows, per_octave) == rows  # a bucket is its own bucket: totals inside it share one graph
    assert bucket_seqlen(total) >= total and bucket_seqlen(total) % SEQLEN_STEP == 0


def test_bucket_count_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="CUDA_GRAPH_BUCKETS"):
        tiny_model(OFF).use_cuda_graphs(True, buckets_per_octave=12)


def tiny_model(algm: ALGMConfig):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, embed_dim=48,
                            depth=6, num_heads=3)
    return apply_algm(vit, algm).eval()


def segments(model):
    """The captured segments' keys (see SegmentRunner._segment) as dicts."""
    names = ("algm", "body", "tail", "head", "length", "rows", "packs", "in_padded", "in_merged", "out_padded",
             "head_padded", "rope_inputs")
    return [dict(zip(names, key[1][1:])) for key in model.block_graphs._graphs]


def image_batches(count: int, batch: int = 4):
    """Batches whose images merge differently (flat ones merge more), so token counts vary within and across them."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count * batch, 3, 64, 64, generator=generator)
    flat = images[::3].mean(dim=(2, 3), keepdim=True)
    images[::3] = flat + 0.05 * images[::3]
    return list(images.split(batch))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_block_runs_through_static_buffers_equal_eager(name):
    """The graph path without capture (CPU): inputs copied into bucket-sized static buffers, tail rows of earlier,
    larger batches left in place, outputs read back: the tokens and counts of the eager run, batch after batch."""
    model = tiny_model(SETTINGS[name])
    batches = image_batches(5)
    with torch.no_grad():
        expected = [model(images) for images in batches]
        model.use_cuda_graphs(True, capture=False)
        got = [model(images) for images in batches]
    keys = segments(model)
    # after a merge the ViT blocks run packed (bucketed rows); the plain model is one dense segment of all blocks
    packed = name != "plain"
    assert any(key["packs"] for key in keys) == packed
    if not packed:
        assert len(keys) == 1 and len(keys[0]["body"]) == 2 * model.depth
    # dense runs: the same ops on the same shapes, bit for bit; packed buckets have more rows (another GEMM blocking)
    # and pad attention to a longer sequence
    tolerance = 1e-5 if packed else 0.0
    for (tokens, state), (ref_tokens, ref_state) in zip(got, expected):
        torch.testing.assert_close(tokens, ref_tokens, rtol=tolerance, atol=tolerance)
        assert state.tokens_per_layer() == ref_state.tokens_per_layer()
    if name == "per_image":  # some batch really ran with a padded tail
        totals = [state.total_tokens for _, state in got]
        assert any(bucket_rows(t) != t for t in totals) and len(set(totals)) > 1


@pytest.mark.parametrize("name", ["per_image", "fixed"])
def test_block_ranges_split_between_calls_equal_eager(name):
    """Adapters run the blocks in ranges: a range that starts after a merge replays the packed tokens as they are."""
    model = tiny_model(SETTINGS[name])

    def run(images):
        x, grid, _ = model.embed(images)
        stream = model.start(x, grid)
        for start, stop in ((0, 4), (4, 5), (5, 6)):
            model.run_blocks(stream, start, stop)
        return stream.x, stream.state.tokens_per_layer()

    with torch.no_grad():
        expected = [run(images) for images in image_batches(3)]
        model.use_cuda_graphs(True, capture=False)
        got = [run(images) for images in image_batches(3)]
    # the ranges after the merges start on merged tokens, padded to their bucket
    assert any(key["head"] is None and key["in_merged"] and key["packs"] for key in segments(model))
    for (tokens, counts), (ref_tokens, ref_counts) in zip(got, expected):
        assert counts == ref_counts
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)


def test_eva02_and_proportional_attention_run_dense_graphs_with_their_extras():
    """EVA-02 blocks (RoPE at merged positions) and proportional attention (log-size key bias) stay padded: their
    segments run on the padded batch with the key bias and RoPE built inside from the state (RoPE's grid phases are
    static inputs), refreshed from batch to batch."""
    from algm_d2.modeling.backbone.build import build_eva
    from algm_d2.modeling.backbone.algm_vit import ALGMViT

    torch.manual_seed(0)
    eva = ALGMViT(vit=build_eva(img_size=64, patch_size=16, embed_dim=48, depth=6, num_heads=3, mlp_ratio=4 * 2 / 3,
                                eva02=True, rope_pretrain_grid=4), algm=PER_IMAGE).eval()
    vit = tiny_model(ALGMConfig(local_layer=1, global_layer=3, local_threshold=0.3, global_threshold="batch_stats",
                                batch_policy="per_image", prop_attn=True))
    batches = image_batches(3)
    for model, rope in ((eva, True), (vit, False)):
        with torch.no_grad():
            expected = [model(images)[0] for images in batches]
            model.use_cuda_graphs(True, capture=False)
            got = [model(images)[0] for images in batches]
        keys = segments(model)
        assert not any(key["packs"] for key in keys) and all(bool(key["rope_inputs"]) == rope for key in keys)
        assert any(key["out_padded"] for key in keys)  # a padded batch's key bias
        for tokens, ref_tokens in zip(got, expected):  # padded to a longer bucket: another GEMM blocking
            torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)


def test_least_recently_used_graphs_are_dropped():
    model = tiny_model(SETTINGS["batch_min"])
    batches = image_batches(4)
    with torch.no_grad():
        expected = [model(images)[0] for images in batches]
        model.use_cuda_graphs(True, max_graphs=1, capture=False)
        got = [model(images)[0] for images in batches]
    assert len(model.block_graphs) == 1
    for tokens, ref_tokens in zip(got, expected):  # packed after the merges: the varlen kernel's rounding
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)


def test_tokens_left_by_a_graph_run_survive_the_next_replay():
    """run_blocks hands out its own tensor, not the graph's buffer that the next batch of the same shape reuses."""
    model = tiny_model(SETTINGS["fixed"])
    model.use_cuda_graphs(True, capture=False, capture_after=1)
    first, second = image_batches(2)
    with torch.no_grad():
        stream = model.start(*model.embed(first)[:2])
        model.run_blocks(stream, 0, model.depth)
        kept, kept_sizes = stream.x.clone(), stream.state.sizes.clone()
        graphs = len(model.block_graphs)
        model.run_blocks(model.start(*model.embed(second)[:2]), 0, model.depth)
    assert len(model.block_graphs) == graphs  # both batches replayed the same segments
    torch.testing.assert_close(stream.x, kept, rtol=0, atol=0)
    torch.testing.assert_close(stream.state.sizes, kept_sizes, rtol=0, atol=0)


def test_moving_the_model_drops_its_graphs():
    """.to() / .half() may move the parameters: graphs captured on the old storage must not replay."""
    model = tiny_model(SETTINGS["fixed"])
    model.use_cuda_graphs(True, capture=False, capture_after=1)
    images = image_batches(1)[0]
    with torch.no_grad():
        model(images)
        assert len(model.block_graphs) > 0
        model.to(torch.float64)
        assert len(model.block_graphs) == 0
        tokens, _ = model(images.double())
    assert tokens.dtype == torch.float64


def test_partitioned_parameters_turn_graphs_off_with_a_warning(caplog):
    """DeepSpeed ZeRO-3 gathers parameters into fresh storage around each call: no graph may keep their addresses."""
    model = tiny_model(SETTINGS["fixed"])
    model.use_cuda_graphs(True, capture=False)
    model.blocks[0].attn.qkv.weight.ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    with torch.no_grad(), caplog.at_level("WARNING"):
        model(image_batches(1)[0])
    assert len(model.block_graphs) == 0 and "ZeRO-3" in caplog.text


def test_graphs_stay_out_of_training_and_autograd():
    model = tiny_model(PER_IMAGE)
    model.use_cuda_graphs(True, capture=False)
    images = image_batches(1)[0]
    model(images)  # grad enabled
    model.train()
    with torch.no_grad():
        model(images)
    assert len(model.block_graphs) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_cuda_graph_replays_equal_eager_on_cuda(name, precision):
    """Captured and replayed on the GPU (each batch in its own autocast context, as an evaluation loop runs it)."""
    model = tiny_model(SETTINGS[name]).cuda()
    batches = [b.cuda() for b in image_batches(6)]

    def run_all():
        outputs = []
        for images in batches:
            with torch.no_grad(), torch.autocast("cuda", dtype=precision, enabled=precision != torch.float32):
                tokens, state = model(images)
            outputs.append((tokens.float(), state.tokens_per_layer()))
        return outputs

    expected = run_all()
    model.use_cuda_graphs(True)
    first, again = run_all(), run_all()  # captures, then replays only
    captures = model.block_graphs.captures
    assert captures > 0 and run_all() and model.block_graphs.captures == captures
    for got in (first, again):
        for (tokens, counts), (ref_tokens, ref_counts) in zip(got, expected):
            assert counts == ref_counts
            tolerance = 2e-2 if precision == torch.bfloat16 else 1e-5
            torch.testing.assert_close(tokens, ref_tokens, rtol=tolerance, atol=tolerance)


def test_a_run_is_captured_only_when_its_shape_comes_back():
    """Shapes seen once (a batch-level token count of ever new images) run eagerly: no capture storm."""
    model = tiny_model(SETTINGS["fixed"])
    model.use_cuda_graphs(True, capture=False, capture_after=2)
    first, second = image_batches(2)
    with torch.no_grad():
        eager, _ = model(first)
        assert len(model.block_graphs) == 0 and model.block_graphs.eager_runs > 0
        again, _ = model(first)
        assert len(model.block_graphs) > 0
        kept = len(model.block_graphs)
        model(second[:1])  # a new shape: eager, nothing new is kept
        assert len(model.block_graphs) == kept
    torch.testing.assert_close(again, eager, rtol=0, atol=0)


def test_a_segment_that_cannot_be_captured_runs_eagerly_with_a_warning(monkeypatch, caplog):
    """A capture that fails (an op syncing with the host, say) must not fail the forward pass: that key runs eagerly
    from then on, and the outputs are the eager ones."""
    from algm_d2.modeling.backbone.block_graphs import BlockGraphs

    model = tiny_model(SETTINGS["fixed"])
    batches = image_batches(3)
    with torch.no_grad():
        expected = [model(images)[0] for images in batches]
        model.use_cuda_graphs(True, capture_after=1)

        def failing_capture(self, run, inputs):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(BlockGraphs, "usable", lambda self, x: True)
        monkeypatch.setattr(BlockGraphs, "_capture", failing_capture)
        with caplog.at_level("WARNING"):
            got = [model(images)[0] for images in batches]
    assert "could not be captured" in caplog.text and len(model.block_graphs) == 0
    assert len(model.block_graphs._uncapturable) > 0
    for tokens, ref_tokens in zip(got, expected):
        torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, syncs", [("per_image", 2), ("batch_min", 2), ("fixed", 0), ("plain", 0)])
def test_a_graphed_forward_syncs_once_per_thresholded_stage(monkeypatch, name, syncs):
    """The host reads token counts once per stage with a threshold (the segment after it needs the sizes) and never
    for fixed levels or the plain model, however many segments run."""
    from algm_d2.merge.rules import SequenceSizes

    model = tiny_model(SETTINGS[name])
    model.use_cuda_graphs(True, capture=False)
    reads = []
    original = SequenceSizes.of.__func__

    def counted(cls, num_tokens):
        reads.append(num_tokens.shape)
        return original(cls, num_tokens)

    monkeypatch.setattr(SequenceSizes, "of", classmethod(counted))
    with torch.no_grad():
        for images in image_batches(3):
            reads.clear()
            model(images)
            assert len(reads) == syncs


@pytest.mark.parametrize("name", ["per_image", "batch_min", "fixed", "eva02"])
def test_segments_run_no_op_that_syncs_with_the_host(monkeypatch, name):
    """What a segment runs must be capturable as a CUDA graph: no op that reads a value back to the host (``.item()``,
    ``.tolist()``, ``nonzero``, boolean masking ...). Checked on the CPU at the dispatcher, where these ops show up
    whatever the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from algm_d2.modeling.backbone.block_graphs import BlockGraphs

    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave",
               "is_nonzero", "equal"}
    seen = []

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in syncing:
                seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    segment = BlockGraphs.segment

    def checked(self, key, run, inputs):
        def watched(*args):
            with HostReads():
                return run(*args)
        return segment(self, key, watched, inputs)

    monkeypatch.setattr(BlockGraphs, "segment", checked)
    if name == "eva02":  # padded segments with the key mask and RoPE at merged positions
        from algm_d2.modeling.backbone.algm_vit import ALGMViT
        from algm_d2.modeling.backbone.build import build_eva

        torch.manual_seed(0)
        model = ALGMViT(vit=build_eva(img_size=64, patch_size=16, embed_dim=48, depth=6, num_heads=3,
                                      mlp_ratio=4 * 2 / 3, eva02=True, rope_pretrain_grid=4), algm=PER_IMAGE).eval()
    else:
        model = tiny_model(SETTINGS[name])
    model.use_cuda_graphs(True, capture=False)
    with torch.no_grad():
        for images in image_batches(2):
            model(images)
    assert len(model.block_graphs) > 0 or model.block_graphs.eager_runs > 0
    assert not seen, f"ops that read values back to the host inside a segment: {sorted(set(seen))}"


@pytest.mark.parametrize("name, budget", [("per_image", 64), ("batch_min", 48), ("fixed", 56), ("plain", 8)])
def test_a_graphed_forward_issues_few_ops_outside_its_graphs(monkeypatch, name, budget):
    """With every segment captured, the host's own work per forward pass is the static-input copies, the count
    syncs and the final copies out of the graphs' buffers — tens of ops, not the ~100 per merge of the eager path.
    Counted at the dispatcher on the CPU (what the replays themselves run is excluded); the budget keeps host cost
    from creeping back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from algm_d2.modeling.backbone import block_graphs
    from algm_d2.modeling.backbone.block_graphs import BlockGraphs

    inside, outside = [False], []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                outside.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def replayed(fn):  # what a graph replay does on the GPU, not the host
        def run(*args):
            inside[0] = True
            try:
                return fn(*args)
            finally:
                inside[0] = False
        return run

    segment = BlockGraphs.segment
    monkeypatch.setattr(BlockGraphs, "segment", lambda self, key, run, inputs: segment(self, key, replayed(run), inputs))
    monkeypatch.setattr(block_graphs, "_copy_outputs", replayed(block_graphs._copy_outputs))
    model = tiny_model(SETTINGS[name])
    model.use_cuda_graphs(True, capture=False, capture_after=1)
    batches = image_batches(3)
    with torch.no_grad():
        for images in batches:  # every segment's key seen
            model(images)
        captured = len(model.block_graphs)
        x, grid, _ = model.embed(batches[0])
        stream = model.start(x, grid)
        with Count():
            model.run_blocks(stream, 0, model.depth)
    assert len(model.block_graphs) == captured  # replays only
    assert len(outside) <= budget, f"{len(outside)} ops outside the graphs: {sorted(set(outside))}"
