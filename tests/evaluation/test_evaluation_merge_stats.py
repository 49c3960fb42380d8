"""MergeStatsAccumulator on synthetic token counts with hand-computed ratios."""
import json
from types import SimpleNamespace

import pytest

from algm_d2.config import get_cfg
from algm_d2.evaluation import MergeStatsAccumulator
from algm_d2.merge import ALGMConfig
from algm_d2.modeling import algm_config_from_cfg, build_model

# 3 blocks, 1 class token, 8 patches: 9 tokens at the start. Per image, tokens leaving blocks 1, 2, 3:
# image 0: 9, 9, 7   image 1: 5, 5, 3   (first batch)   image 2: 5, 5, 5   (second batch)
BATCHES = [
    {"tokens_per_layer": [[9, 5], [9, 5], [7, 3]], "initial_tokens": 9, "num_prefix": 1},
    {"tokens_per_layer": [[5], [5], [5]], "initial_tokens": 9, "num_prefix": 1},
]


def _filled(**kwargs):
    stats = MergeStatsAccumulator(**kwargs)
    for batch in BATCHES:
        stats.update(batch)
    return stats


def test_ratios_per_block_and_algm_layers():
    summary = _filled(local_layer=1, global_layer=3, histogram_bins=2).summary()
    assert json.loads(json.dumps(summary)) == summary  # JSON-ready
    assert (summary["num_images"], summary["num_layers"], summary["num_prefix"]) == (3, 3, 1)
    assert summary["initial_tokens_mean"] == 9.0
    assert summary["mean_tokens_per_layer"] == pytest.approx([19 / 3, 19 / 3, 5.0])
    # patch tokens kept / 8: image 0 (1, 1, 6/8), image 1 (4/8, 4/8, 2/8), image 2 (4/8, 4/8, 4/8)
    assert summary["kept_ratio_per_layer"] == pytest.approx([2 / 3, 2 / 3, 1 / 2])
    # tokens / 9: block 1 (9 + 5 + 5) / 27, block 3 (7 + 3 + 5) / 27
    assert summary["kept_ratio_with_prefix_per_layer"] == pytest.approx([19 / 27, 19 / 27, 15 / 27])
    local, global_ = summary["algm_layers"]["local"], summary["algm_layers"]["global"]
    assert local["layer"] == 1
    assert (local["mean_tokens"], local["kept_ratio"]) == (pytest.approx(19 / 3), pytest.approx(2 / 3))
    assert global_ == summary["final"] and global_["layer"] == 3
    assert global_["kept_ratio_with_prefix"] == pytest.approx(15 / 27)
    histogram = global_["tokens_per_image"]  # final counts 7, 3, 5
    assert (histogram["min"], histogram["max"], histogram["mean"], histogram["p50"]) == (3, 7, 5.0, 5.0)
    assert histogram["std"] == pytest.approx((8 / 3) ** 0.5)
    assert histogram["p10"] == pytest.approx(3.4) and histogram["p90"] == pytest.approx(6.6)
    assert histogram["bin_edges"] == [3.0, 5.0, 7.0] and histogram["counts"] == [1, 2]


def test_without_algm_layers_and_empty():
    assert MergeStatsAccumulator().summary() == {"num_images": 0}
    summary = _filled().summary()
    assert summary["algm_layers"] == {} and summary["final"]["layer"] == 3
    stats = _filled()
    stats.reset()
    assert stats.num_images == 0


def built(cfg):
    """What for_model reads of a model built from ``cfg``: its ALGMConfig."""
    return SimpleNamespace(algm=algm_config_from_cfg(cfg))


def test_from_config_uses_the_algm_layers_only_when_enabled():
    cfg = get_cfg()
    assert MergeStatsAccumulator.for_model(built(cfg)).global_layer is None
    cfg.MODEL.ALGM.ENABLED = True
    stats = MergeStatsAccumulator.for_model(built(cfg))
    assert (stats.local_layer, stats.global_layer) == (cfg.MODEL.ALGM.LOCAL_LAYER, cfg.MODEL.ALGM.GLOBAL_LAYER)


@pytest.mark.parametrize("bad, message", [
    ({"tokens_per_layer": [[9, 5], [9]], "initial_tokens": 9, "num_prefix": 1}, "equally long"),
    ({"tokens_per_layer": [[9, 10]], "initial_tokens": 9, "num_prefix": 1}, r"\[0\]\[1\] = 10"),
    ({"tokens_per_layer": [[9], [0]], "initial_tokens": 9, "num_prefix": 1}, r"\[1\]\[0\] = 0"),
    ({"tokens_per_layer": [[9]], "initial_tokens": 9}, "num_prefix"),
    ({"tokens_per_layer": [[9]], "initial_tokens": 9, "num_prefix": 9}, "num_prefix 9"),
])
def test_bad_merge_stats_are_named(bad, message):
    with pytest.raises((ValueError, KeyError), match=message):
        MergeStatsAccumulator().update(bad)


def test_inconsistent_batches_are_rejected():
    stats = _filled()
    with pytest.raises(ValueError, match="has 2 blocks, earlier batches had 3"):
        stats.update({"tokens_per_layer": [[9], [9]], "initial_tokens": 9, "num_prefix": 1})
    with pytest.raises(ValueError, match="num_prefix'] changed from 1 to 2"):
        stats.update({"tokens_per_layer": [[9], [9], [9]], "initial_tokens": 9, "num_prefix": 2})
    with pytest.raises(ValueError, match="global_layer 5 is beyond the 3 blocks"):
        MergeStatsAccumulator(global_layer=5).update(BATCHES[0])
    assert stats.num_images == 3


def test_the_algm_layers_are_the_models_own_after_set_algm():
    cfg = get_cfg()
    cfg.merge_from_file("configs/demo/segmenter_tiny_algm.yaml")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    stats = MergeStatsAccumulator.for_model(model)
    assert (stats.local_layer, stats.global_layer) == (cfg.MODEL.ALGM.LOCAL_LAYER, cfg.MODEL.ALGM.GLOBAL_LAYER)
    model.net.set_algm(ALGMConfig(local_layer=2, global_layer=3))
    stats = MergeStatsAccumulator.for_model(model)
    assert (stats.local_layer, stats.global_layer) == (2, 3)
    assert MergeStatsAccumulator.for_model(object()).local_layer is None  # a model that does not merge
