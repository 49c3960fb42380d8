"""Property and reference tests of the merge library (algm_d2.merge) on raw [B, N, C] tokens."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from algm_d2.merge import (
    ALGMConfig, CosineSimilarityStats, FixedLevel, MergeState, global_merge, local_merge, merge_counts, parse_rule,
    window_similarity,
)

from .merge_reference import clap_reference, gbm_reference

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def clustered_tokens(batch: int, grid: tuple, prefix: int, dim: int, seed: int, noise: float = 0.3) -> torch.Tensor:
    """Tokens drawn around a few centres so that windows and matches are similar often but not always."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    centres = torch.randn(4, dim, generator=gen)
    region = (torch.arange(h)[:, None] * 3 // h * 2 + torch.arange(w)[None, :] * 2 // w) % 4
    patches = centres[region.flatten()][None].repeat(batch, 1, 1)
    patches = patches + noise * torch.randn(batch, h * w, dim, generator=gen)
    return torch.cat([torch.randn(batch, prefix, dim, generator=gen), patches], dim=1)


def members(state: MergeState, b: int) -> dict:
    """slot -> list of grid cells, read from the index map."""
    groups: dict = {}
    for cell, slot in enumerate(state.index_map[b].tolist()):
        groups.setdefault(slot, []).append(cell)
    return groups


rules = st.one_of(
    st.floats(min_value=-0.5, max_value=1.0),
    st.just("batch_stats"),
    st.builds(lambda c: FixedLevel(count=c), st.integers(0, 20)),
    st.builds(lambda f: FixedLevel(fraction=f), st.floats(0.0, 1.0)),
)


@SETTINGS
@given(h=st.integers(2, 9), w=st.integers(2, 9), prefix=st.integers(0, 2), kh=st.integers(1, 2),
       kw=st.integers(1, 3), local_rule=rules, global_rule=rules, policy=st.sampled_from(["min", "per_image"]),
       seed=st.integers(0, 2**16))
def test_merge_invariants(h, w, prefix, kh, kw, local_rule, global_rule, policy, seed):
    """Sizes sum to H·W, prefix untouched in front, merged values and positions are size-weighted means of their
    cells, the index map unmerges — for both policies, any grid and window, every rule."""
    if kh * kw < 2 or kh > h or kw > w:
        return
    x = clustered_tokens(3, (h, w), prefix, 8, seed)
    state0 = MergeState.initial(3, (h, w), prefix, x.device)
    y, state = local_merge(x, state0, (kh, kw), local_rule, policy, 1)
    y, state = global_merge(y, state, global_rule, policy, 5)
    valid = state.valid_mask()
    for b in range(3):
        n = int(state.num_tokens[b])
        assert torch.equal(y[b, :prefix], x[b, :prefix])
        assert float(state.sizes[b].sum()) == h * w + prefix
        assert (state.sizes[b, :n] >= 1).all() and (state.sizes[b, n:] == 0).all()
        if valid is not None:
            assert valid[b].sum() == n
        groups = members(state, b)
        assert set(groups) == set(range(prefix, n)), "every real slot holds cells and no padding slot does"
        for slot, cells in groups.items():
            assert float(state.sizes[b, slot]) == len(cells)
            expected = x[b, prefix:][cells].double().mean(0)
            torch.testing.assert_close(y[b, slot].double(), expected, rtol=1e-5, atol=1e-5)
            rows = torch.tensor([c // w for c in cells], dtype=torch.float64).mean()
            cols = torch.tensor([c % w for c in cells], dtype=torch.float64).mean()
            torch.testing.assert_close(state.positions[b, slot].double(), torch.stack([rows, cols]),
                                       rtol=1e-5, atol=1e-5)
    grid = state.unmerge(y)
    assert grid.shape == (3, h * w, 8)
    if policy == "min":
        assert len(set(state.num_tokens.tolist())) == 1


@SETTINGS
@given(h=st.integers(2, 8), w=st.integers(2, 8), prefix=st.integers(0, 2), r_local=st.integers(0, 16),
       r_global=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_matches_loop_reference(h, w, prefix, r_local, r_global, seed):
    """Token order, values and groups equal an independent loop implementation of the release's semantics."""
    x = clustered_tokens(1, (h, w), prefix, 6, seed, noise=1.0)
    state0 = MergeState.initial(1, (h, w), prefix, x.device)
    y, state = local_merge(x, state0, (2, 2), FixedLevel(count=r_local), "min", 1)
    ref = clap_reference(x[0], prefix, (h, w), (2, 2), min(r_local, (h // 2) * (w // 2)))
    y, state = global_merge(y, state, FixedLevel(count=r_global), "min", 5)
    if r_global:  # a fixed level of 0 skips the stage; a count of 0 by threshold still reorders (the release)
        ref = gbm_reference(*ref, prefix, r_global)
    ref_tokens, ref_sizes, ref_groups = ref
    assert y.shape[1] == len(ref_tokens)
    torch.testing.assert_close(y[0].double(), torch.stack(ref_tokens), rtol=1e-5, atol=1e-5)
    assert state.sizes[0].tolist() == ref_sizes
    groups = members(state, 0)
    for slot in range(prefix, len(ref_groups)):
        assert set(groups[slot]) == ref_groups[slot]


def test_window_similarity_equals_pairwise_cosines():
    torch.manual_seed(0)
    patches = torch.randn(2, 6, 9, 5)
    patches[0, :2, :2] = 0.0  # zero tokens: pairwise cosine is 0 for them
    for window in [(2, 2), (2, 1), (3, 3), (2, 4)]:
        sims = window_similarity(patches, window)
        kh, kw = window
        for b, gy, gx in itertools.product(range(2), range(6 // kh), range(9 // kw)):
            cells = patches[b, gy * kh:(gy + 1) * kh, gx * kw:(gx + 1) * kw].reshape(-1, 5).double()
            unit = torch.nn.functional.normalize(cells, dim=-1)
            cos = unit @ unit.T
            n = cells.shape[0]
            expected = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
            assert abs(float(sims[b, gy, gx]) - float(expected)) < 1e-5


def test_stage_that_merges_nothing_keeps_the_model_within_tolerance():
    """CLAP with τ above any cosine keeps order and values; GBM with such τ reorders only (unmerge restores)."""
    x = clustered_tokens(2, (6, 8), 1, 8, 3)
    state0 = MergeState.initial(2, (6, 8), 1, x.device)
    y, state = local_merge(x, state0, (2, 2), 1.5, "min", 1)
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    z, state = global_merge(y, state, 1.5, "min", 5)
    assert z.shape == x.shape
    torch.testing.assert_close(state.unmerge(z), x[:, 1:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z[:, 0], x[:, 0])


def test_per_image_batch_equals_images_alone():
    """Padded per-image merging of a mixed batch equals merging each image on its own."""
    x = torch.cat([clustered_tokens(1, (8, 8), 1, 8, seed, noise=n) for seed, n in [(1, 0.05), (2, 1.0), (3, 0.3)]])
    state0 = MergeState.initial(3, (8, 8), 1, x.device)
    y, state = local_merge(x, state0, (2, 2), 0.8, "per_image", 1)
    y, state = global_merge(y, state, "batch_stats", "per_image", 5)
    assert state.padded and len(set(state.num_tokens.tolist())) == 3
    for b in range(3):
        yb, sb = local_merge(x[b:b + 1], MergeState.initial(1, (8, 8), 1, x.device), (2, 2), 0.8, "per_image", 1)
        yb, sb = global_merge(yb, sb, "batch_stats", "per_image", 5)
        n = int(state.num_tokens[b])
        assert n == yb.shape[1]
        torch.testing.assert_close(y[b, :n], yb[0])
        assert torch.equal(state.index_map[b], sb.index_map[0])


def test_padding_values_never_reach_real_slots():
    """A padded batch's padding tokens may hold anything (NaN, inf): the next merge sends them to trash slots, so
    the merged tokens and state equal those of the same batch with zero padding."""
    x = torch.cat([clustered_tokens(1, (8, 8), 1, 8, seed, noise=n) for seed, n in [(1, 0.05), (2, 1.0), (3, 0.3)]])
    y, state = local_merge(x, MergeState.initial(3, (8, 8), 1, x.device), (2, 2), 0.8, "per_image", 1)
    padding = ~state.valid_mask()
    assert state.padded and padding.any()
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        merged, after = global_merge(y.masked_fill(padding[..., None], fill), state, 0.5, "per_image", 5)
        valid = after.valid_mask()
        assert torch.isfinite(merged[valid]).all() and torch.isfinite(after.positions).all()
        results.append((merged[valid], after.sizes, after.positions, after.index_map))
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], result))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="atomics make CUDA sums order-dependent; CI has no GPU")
def test_merges_are_bitwise_repeatable_on_cuda():
    """Both stages give bitwise the same tokens and plan run after run (on a GPU machine; CI has none)."""
    x = clustered_tokens(32, (32, 32), 1, 384, 0).cuda()
    runs = []
    for _ in range(4):
        y, state = local_merge(x, MergeState.initial(32, (32, 32), 1, x.device), (2, 2), FixedLevel(fraction=0.25),
                               "min", 1)
        y, state = global_merge(y, state, FixedLevel(fraction=0.3), "min", 5)
        runs.append((y, state.index_map, state.sizes, state.positions))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_min_policy_merges_the_batch_minimum_best_groups():
    x = torch.cat([clustered_tokens(1, (8, 8), 1, 8, seed, noise=n) for seed, n in [(1, 0.05), (2, 1.0)]])
    scores = window_similarity(x[:, 1:].reshape(2, 8, 8, 8), (2, 2)).flatten(1)
    per_image = (scores >= 0.8).sum(1)
    _, state = local_merge(x, MergeState.initial(2, (8, 8), 1, x.device), (2, 2), 0.8, "min", 1)
    r = int(per_image.min())
    assert state.num_tokens.tolist() == [1 + 64 - 3 * r] * 2


def test_batch_stats_rule_is_the_release_formula():
    torch.manual_seed(0)
    scores = torch.rand(3, 10)
    layer = 5
    tau = scores.mean(1).mean() + scores.std(1).mean() / layer
    expected = (scores >= tau).sum(1).min()
    assert merge_counts(scores, None, "batch_stats", "min", layer).tolist() == [int(expected)] * 3
    tau_each = scores.mean(1) + scores.std(1) / layer
    assert merge_counts(scores, None, "batch_stats", "per_image", layer).tolist() == \
        (scores >= tau_each[:, None]).sum(1).tolist()
    assert merge_counts(scores, None, FixedLevel(fraction=0.25), "per_image", layer).tolist() == [2, 2, 2]
    assert merge_counts(scores, None, FixedLevel(count=50), "min", layer).tolist() == [10, 10, 10]


def test_gradients_flow_through_both_stages():
    x = clustered_tokens(2, (6, 6), 1, 8, 0).requires_grad_(True)
    state0 = MergeState.initial(2, (6, 6), 1, x.device)
    y, state = local_merge(x, state0, (2, 2), 0.5, "per_image", 1)
    y, state = global_merge(y, state, "batch_stats", "per_image", 5)
    (state.unmerge(y) ** 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad[:, 1:].abs().sum() > 0


def test_proportional_attention_bias_and_padding_mask():
    x = torch.cat([clustered_tokens(1, (4, 4), 1, 8, s, noise=n) for s, n in [(1, 0.01), (2, 2.0)]])
    _, state = local_merge(x, MergeState.initial(2, (4, 4), 1, x.device), (2, 2), 0.9, "per_image", 1)
    assert state.padded
    bias = state.attention_bias(prop_attn=True, dtype=torch.float32)
    torch.testing.assert_close(bias[:, 0, 0].exp(), state.sizes)
    mask_only = state.attention_bias(prop_attn=False, dtype=torch.float32)[:, 0, 0]
    assert torch.equal(torch.isinf(mask_only), ~state.valid_mask())
    assert MergeState.initial(2, (4, 4), 1, x.device).attention_bias(False, torch.float32) is None


def test_calibration_streams_the_exact_pairwise_statistics():
    torch.manual_seed(0)
    batches = [torch.randn(2, 7, 5) + 0.5, torch.randn(3, 7, 5)]
    stats = CosineSimilarityStats()
    values = []
    for batch in batches:
        stats.update(batch)
        for tokens in batch.double():
            unit = torch.nn.functional.normalize(tokens, dim=-1)
            cos = unit @ unit.T
            values.append(cos[~torch.eye(7, dtype=torch.bool)])
    values = torch.cat(values)
    result = stats.result()
    assert abs(result["mean"] - float(values.mean())) < 1e-9
    assert abs(result["std"] - float(values.std(unbiased=False))) < 1e-9
    assert abs(result["threshold"] - (result["mean"] + result["std"])) < 1e-12
    assert result["pairs"] == values.numel()


@pytest.mark.parametrize("kwargs, field", [
    ({"window": (0, 2)}, "window"),
    ({"window": (-2, 2)}, "window"),
    ({"window": (1, 1)}, "window"),
    ({"local_layer": 0}, "local_layer"),
    ({"global_layer": -1}, "global_layer"),
    ({"global_layer": 1, "local_layer": 3}, "global_layer"),
    ({"local_threshold": "median"}, "local_threshold"),
    ({"global_threshold": "top:x"}, "global_threshold"),
    ({"global_threshold": "fraction:1.5"}, "global_threshold"),
    ({"batch_policy": "max"}, "batch_policy"),
])
def test_bad_options_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ALGMConfig(**kwargs)


def test_layer_out_of_range_raises():
    with pytest.raises(ValueError, match="global_layer=13"):
        ALGMConfig(global_layer=13).check_depth(12)


@pytest.mark.parametrize("grid, window", [((3, 8), (4, 4)), ((1, 16), (2, 2)), ((1, 1), (2, 2)), ((16, 1), (1, 2))])
def test_a_grid_smaller_than_the_window_skips_clap(grid, window):
    """No full window fits (extreme aspect ratios): CLAP merges nothing, even with a rule that merges every window."""
    x = clustered_tokens(2, grid, 1, 4, 0)
    state = MergeState.initial(2, grid, 1, x.device)
    merged, after = local_merge(x, state, window, -1.0, "min", 1)
    assert merged is x and not after.merged


def test_rule_parsing():
    assert parse_rule("0.7", "x") == 0.7
    assert parse_rule("top:64", "x") == FixedLevel(count=64)
    assert parse_rule("fraction:0.25", "x") == FixedLevel(fraction=0.25)
    assert parse_rule("none", "x") is None and parse_rule(None, "x") is None
    assert not ALGMConfig(local_threshold=None, global_threshold="none").enabled


def test_fixed_level_zero_skips_both_stages_and_threshold_zero_keeps_the_release_order():
    x = clustered_tokens(2, (4, 6), 1, 6, 0, noise=1.0)
    state0 = MergeState.initial(2, (4, 6), 1, x.device)
    for stage in (lambda y, s: local_merge(y, s, (2, 2), FixedLevel(count=0), "min", 1),
                  lambda y, s: global_merge(y, s, FixedLevel(fraction=0.0), "per_image", 5)):
        y, state = stage(x, state0)
        assert y is x and state is state0
    y, state = global_merge(x, state0, 2.0, "min", 5)  # τ above any cosine: nothing merges, tokens reordered
    assert y.shape == x.shape and not torch.equal(y, x)
    assert torch.equal(state.unmerge(y), state0.unmerge(x))
