"""Comparison and ablation modes of the merge library: ToMe, GBM in CLAP's place, random members, no reduction."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from algm_d2.merge import (
    ALGMConfig, MergeState, merge_after_attention, pick_random_members, stage_function, tome_merge,
    without_reduction,
)
from algm_d2.modeling import apply_algm, build_segmenter_vit

from .merge_reference import tome_reference
from .test_merge_ops import clustered_tokens, members

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(h=st.integers(2, 7), w=st.integers(2, 7), prefix=st.integers(0, 2), r=st.integers(0, 12),
       layers=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_tome_matches_loop_reference_over_layers(h, w, prefix, r, layers, seed):
    """ToMe applied layer after layer equals the float64 loop reference: order, values, sizes and grid cells."""
    x = clustered_tokens(1, (h, w), prefix, 6, seed, noise=1.0)
    state = MergeState.initial(1, (h, w), prefix, x.device)
    ref = ([t.double() for t in x[0]], [1.0] * x.shape[1], [set() for _ in range(prefix)] + [{c} for c in range(h * w)])
    y = x
    for layer in range(1, layers + 1):
        y, state = tome_merge(y, state, r, "min", layer)
        ref = tome_reference(*ref, prefix, r)
        torch.testing.assert_close(y[0].double(), torch.stack(ref[0]), rtol=1e-5, atol=1e-5)
        assert state.sizes[0].tolist() == ref[1]
        groups = members(state, 0)
        assert all(set(groups[slot]) == ref[2][slot] for slot in range(prefix, len(ref[2])))


def tiny_encoder(config: ALGMConfig, depth: int = 6):
    torch.manual_seed(0)
    vit = build_segmenter_vit(img_size=64, embed_dim=32, depth=depth, num_heads=2)
    return apply_algm(vit, config).eval()


def test_tome_merges_r_tokens_at_every_or_chosen_layers_with_proportional_attention():
    images = torch.randn(2, 3, 64, 64)
    counts = [17]
    for _ in range(6):
        counts.append(counts[-1] - min(3, (counts[-1] - 1) // 2))
    encoder = tiny_encoder(ALGMConfig(local_layer=None, global_layer=None, tome_r=3, prop_attn=True))
    with torch.no_grad():
        tokens, state = encoder(images)
    assert [row[0] for row in state.tokens_per_layer()] == counts[1:]
    assert state.attention_bias(True, torch.float32) is not None
    chosen = tiny_encoder(ALGMConfig(local_layer=None, global_layer=None, tome_r=4, tome_layers=(2, 5)))
    with torch.no_grad():
        _, state = chosen(images)
    assert [row[0] for row in state.tokens_per_layer()] == [17, 13, 13, 13, 9, 9]


def test_table_5b_rows_place_the_right_modules():
    assert ALGMConfig().stages_at(1) == ("clap",) and ALGMConfig().stages_at(5) == ("gbm",)
    gbm_at_1 = ALGMConfig(local_method="gbm", local_threshold="batch_stats", global_layer=None)
    assert gbm_at_1.stages_at(1) == ("local_gbm",) and not any(gbm_at_1.merges_at(k) for k in range(2, 13))
    both = ALGMConfig(local_method="gbm", local_threshold="batch_stats")
    assert both.stages_at(1) == ("local_gbm",) and both.stages_at(5) == ("gbm",)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, state = tiny_encoder(ALGMConfig(local_method="gbm", local_threshold="top:3", global_threshold="top:2"))(images)
    assert [row[0] for row in state.tokens_per_layer()] == [14, 14, 14, 14, 12, 12]  # GBM after layers 1 and 5


@pytest.mark.parametrize("kwargs, field", [
    ({"tome_r": 2}, "tome_r"), ({"tome_r": -1, "local_layer": None, "global_layer": None}, "tome_r"),
    ({"local_method": "pool"}, "local_method"), ({"merge_value": "median"}, "merge_value"),
    ({"reduce_tokens": 0}, "reduce_tokens"), ({"tome_layers": (0,)}, "tome_layers"),
])
def test_bad_mode_options_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ALGMConfig(**kwargs)


def test_tome_layers_past_the_depth_raise():
    with pytest.raises(ValueError, match="tome_layers"):
        ALGMConfig(local_layer=None, global_layer=None, tome_r=2, tome_layers=(3, 13)).check_depth(12)


def test_random_member_is_drawn_with_probability_proportional_to_size():
    """After GBM a slot may hold a 4-cell CLAP token and single cells: the draw follows the cells."""
    torch.manual_seed(0)
    x = clustered_tokens(2, (6, 6), 1, 8, seed=3)
    y_avg, s_avg = merge_after_attention(x, MergeState.initial(2, (6, 6), 1, x.device),
                                         ALGMConfig(local_threshold=-1.0), 1)
    y2, s2 = merge_after_attention(y_avg, s_avg, ALGMConfig(local_layer=None, global_threshold=-1.0), 5)
    slot = next(s for s, cells in members(s2, 0).items() if len(cells) > 4)
    owners = s_avg.index_map[0][torch.tensor(members(s2, 0)[slot])]
    weights = {int(o): int((owners == o).sum()) for o in owners.unique()}
    hits = {o: 0 for o in weights}
    for _ in range(400):
        picked = pick_random_members(y_avg, s_avg, y2, s2)[0, slot]
        hits[next(o for o in weights if torch.equal(picked, y_avg[0, o]))] += 1
    total = sum(weights.values())
    for o, w in weights.items():
        assert abs(hits[o] / 400 - w / total) < 0.1, (hits, weights)


modes = st.sampled_from([
    {},  # ALGM: CLAP at 1, GBM at 5
    {"local_method": "gbm", "local_threshold": "batch_stats"},  # GBM at 1 and 5
    {"local_layer": None, "global_layer": None, "tome_r": 3, "tome_layers": (1, 5)},  # ToMe
])


@SETTINGS
@given(h=st.integers(2, 8), w=st.integers(2, 8), prefix=st.integers(0, 2), mode=modes,
       tau=st.floats(-0.2, 1.0), policy=st.sampled_from(["min", "per_image"]),
       value=st.sampled_from(["average", "random"]), seed=st.integers(0, 2**16))
def test_no_reduction_keeps_all_tokens_and_equals_the_unmerged_reduced_result(h, w, prefix, mode, tau, policy, value,
                                                                               seed):
    """Without blocks in between, the no-reduction sequence is the reduced one unmerged: the same groups, each
    member holding its group's value (average or drawn member), prefix tokens untouched, every token kept."""
    x = clustered_tokens(3, (h, w), prefix, 8, seed)
    state0 = MergeState.initial(3, (h, w), prefix, x.device)
    rules = {} if "tome_r" in mode else {"local_threshold": tau, "global_threshold": "batch_stats"}
    common = {**rules, **mode, "batch_policy": policy, "merge_value": value}
    reduced, kept = ALGMConfig(**common), ALGMConfig(**common, reduce_tokens=False)
    y_red, s_red, y_full, s_full = x, state0, x, state0
    for layer in (1, 5):
        torch.manual_seed(seed + layer)
        y_red, s_red = merge_after_attention(y_red, s_red, reduced, layer)
        torch.manual_seed(seed + layer)
        y_full, s_full = merge_after_attention(y_full, s_full, kept, layer)
    n = prefix + h * w
    assert y_full.shape == x.shape and not s_full.merged and s_full.num_tokens.tolist() == [n] * 3
    assert torch.equal(s_full.virtual.index_map, s_red.index_map)
    torch.testing.assert_close(y_full[:, prefix:], s_red.unmerge(y_red), rtol=1e-5, atol=1e-5)
    assert torch.equal(y_full[:, :prefix], x[:, :prefix])


@SETTINGS
@given(h=st.integers(2, 8), w=st.integers(2, 8), prefix=st.integers(0, 2), mode=modes, tau=st.floats(-0.2, 1.0),
       policy=st.sampled_from(["min", "per_image"]), seed=st.integers(0, 2**16))
def test_random_member_keeps_the_groups_and_takes_a_member_value(h, w, prefix, mode, tau, policy, seed):
    """Random members change only the values a stage writes: on the same input its layout, sizes and counts equal
    the average mode's, and every merged token holds exactly the value one of its members had before the stage."""
    x = clustered_tokens(2, (h, w), prefix, 8, seed)
    rules = {} if "tome_r" in mode else {"local_threshold": tau, "global_threshold": "batch_stats"}
    common = {**rules, **mode, "batch_policy": policy}
    average, random = ALGMConfig(**common), ALGMConfig(**common, merge_value="random")
    y_rand, s_rand = x, MergeState.initial(2, (h, w), prefix, x.device)
    for layer in (1, 5):
        before, state_before = y_rand, s_rand
        _, s_avg = merge_after_attention(before, state_before, average, layer)
        y_rand, s_rand = merge_after_attention(before, state_before, random, layer)
        assert torch.equal(s_avg.index_map, s_rand.index_map) and torch.equal(s_avg.sizes, s_rand.sizes)
        assert torch.equal(y_rand[:, :prefix], x[:, :prefix])
        for b in range(2):
            for slot, cells in members(s_rand, b).items():
                old_slots = {int(state_before.index_map[b, c]) for c in cells}
                assert any(torch.equal(y_rand[b, slot], before[b, o]) for o in old_slots)


def test_no_reduction_through_the_encoder_keeps_every_token():
    images = torch.randn(2, 3, 64, 64)
    config = ALGMConfig(local_threshold=0.0, reduce_tokens=False)
    with torch.no_grad():
        tokens, state = tiny_encoder(config)(images)
    assert tokens.shape[1] == 17 and all(row == [17, 17] for row in state.tokens_per_layer())
    assert state.virtual is not None and int(state.virtual.num_tokens[0]) < 17


def test_stage_function_rejects_unknown_stage():
    with pytest.raises(ValueError, match="unknown merge stage"):
        stage_function(ALGMConfig(), "pool", 1)
    assert without_reduction  # exported for callers that build their own stages


def test_mode_keys_reach_the_config_and_errors_name_the_key():
    from algm_d2.config import get_cfg
    from algm_d2.modeling import algm_config_from_cfg

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ALGM.ENABLED", "True", "MODEL.ALGM.LOCAL_LAYER", "None", "MODEL.ALGM.GLOBAL_LAYER",
                         "None", "MODEL.ALGM.TOME_R", "8", "MODEL.ALGM.TOME_LAYERS", "[3, 1]",
                         "MODEL.ALGM.MERGE_VALUE", "random", "MODEL.ALGM.REDUCE_TOKENS", "False"])
    config = algm_config_from_cfg(cfg)
    assert (config.tome_r, config.tome_layers, config.merge_value, config.reduce_tokens) == (8, (1, 3), "random", False)
    cfg.MODEL.ALGM.LOCAL_LAYER = 1
    with pytest.raises(ValueError, match="MODEL.ALGM.TOME_R"):
        algm_config_from_cfg(cfg)
    cfg.MODEL.ALGM.LOCAL_METHOD = "pool"
    with pytest.raises(ValueError, match="MODEL.ALGM.LOCAL_METHOD"):
        algm_config_from_cfg(cfg)
