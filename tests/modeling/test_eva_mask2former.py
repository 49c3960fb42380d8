"""EVA + ViT-Adapter + Mask2Former: EVA's key table, tiny forward/backward with and without ALGM, the criterion by
hand, the merged-token decoder's identity, checkpoints in EVA's mmcv layout and --eval-only through train_net."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algm_d2.checkpoint import CheckpointMismatchError, load_model_weights
from algm_d2.config import get_cfg
from algm_d2.merge import ALGMConfig, FixedLevel, MergeState, global_merge, local_merge
from algm_d2.modeling import build_model
from algm_d2.modeling.mask2former import (
    HungarianMatcher, MergedTokenMaskedTransformerDecoder, SetCriterion, semantic_inference,
    semantic_to_instance_targets,
)
from algm_d2.modeling.mask2former.layers import AttentionWithPos
from algm_d2.modeling.meta_arch.mask2former import Mask2Former

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "tests/fixtures/eva01_ade_m2f_state_dict_shapes.tsv"


def eva_cfg(name: str = "configs/demo/eva_tiny.yaml", *opts: str):
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def key_table() -> dict:
    rows = [line.rstrip("\n").split("\t") for line in TABLE.read_text().splitlines()
            if line and not line.startswith("#") and not line.startswith("name\t")]
    return {name: tuple(int(d) for d in shape.split("x")) if shape else () for name, shape, _ in rows}


def test_full_size_model_has_every_key_and_shape_of_evas_checkpoint():
    with torch.device("meta"):  # 1.28 B parameters, no memory
        net = Mask2Former.from_config(eva_cfg("configs/ade20k/eva.yaml"))
    state = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    table = key_table()
    assert len(table) == 1037
    assert sorted(set(table) - set(state)) == [] and sorted(set(state) - set(table)) == []
    assert {k: (table[k], state[k]) for k in table if table[k] != state[k]} == {}
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 1280.6


def batch(height: int, width: int, with_labels: bool, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
    item = {"image": image, "height": height, "width": width}
    if with_labels:
        label = torch.randint(0, 6, (height, width), generator=g)
        label[: height // 8] = 255
        item["sem_seg"] = label
    return [item, dict(item)]


@pytest.mark.parametrize("config", ["configs/demo/eva_tiny.yaml", "configs/demo/eva_tiny_algm.yaml"])
def test_tiny_model_trains_and_predicts_at_a_non_square_size(config):
    torch.manual_seed(0)
    model = build_model(eva_cfg(config))
    losses = model(batch(96, 160, True))
    assert len(losses) == 3 * 4 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    model.eval()
    with torch.no_grad():
        out = model(batch(96, 160, False)[:1])[0]["sem_seg"]
    assert out.shape == (6, 96, 160) and torch.isfinite(out).all()
    tokens = model.merge_stats["tokens_per_layer"]
    if "algm" in config:
        assert tokens[-1][0] < 1 + 6 * 10


def test_algm_that_merges_nothing_gives_the_baseline_outputs():
    torch.manual_seed(0)
    model = build_model(eva_cfg()).eval()
    images = torch.randn(2, 3, 64, 96)
    nothing = ALGMConfig(local_layer=1, global_layer=3, local_threshold=2.0, global_threshold=2.0)
    with torch.no_grad():
        base = model.net(images)
        model.net.set_algm(nothing)
        merged = model.net(images)
    torch.testing.assert_close(merged, base, rtol=1e-5, atol=1e-6)


def test_semantic_inference_is_the_class_weighted_sum_of_mask_probabilities():
    logits, masks = torch.randn(2, 5, 4), torch.randn(2, 5, 3, 3)
    expected = torch.zeros(2, 3, 3, 3)
    for b in range(2):
        for q in range(5):
            expected[b] += logits[b, q].softmax(-1)[:3, None, None] * masks[b, q].sigmoid()[None]
    torch.testing.assert_close(semantic_inference(logits, masks), expected)


def test_semantic_labels_become_one_mask_per_present_class():
    sem = torch.tensor([[0, 0, 3], [255, 3, 3]])
    target = semantic_to_instance_targets(sem, 255)
    assert target["labels"].tolist() == [0, 3]
    assert target["masks"].tolist() == [[[True, True, False], [False, False, False]],
                                         [[False, False, True], [False, True, True]]]


def test_criterion_matches_hand_computed_losses(monkeypatch):
    """Constant mask logits and all points at the centre make every sampled value known: check CE (no-object weight
    0.1), BCE and dice against the formulas evaluated by hand."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, 0.5, device=kw.get("device")))
    points = 16
    criterion = SetCriterion(num_classes=2, matcher=HungarianMatcher(num_points=points), num_points=points,
                             deep_supervision=False)
    outputs = {"pred_logits": torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]]),
               "pred_masks": torch.stack([torch.full((8, 8), -1.0), torch.full((8, 8), 2.0)])[None]}
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 8, 8, dtype=torch.bool)}]
    assert [(r.tolist(), c.tolist()) for r, c in criterion.matcher(outputs, targets)] == [([1], [0])]
    losses = criterion(outputs, targets)
    ce = (0.1 * math.log(math.e ** 2 + 2) + (math.log(math.e ** 3 + 2) - 3)) / 1.1
    bce = math.log(1 + math.e ** -2)
    p = 1 / (1 + math.e ** -2)
    dice = 1 - (2 * points * p + 1) / (points * p + points + 1)
    assert losses["loss_ce"].item() == pytest.approx(2 * ce, rel=1e-5)
    assert losses["loss_mask"].item() == pytest.approx(5 * bce, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(5 * dice, rel=1e-5)


def test_matcher_assigns_each_mask_to_the_query_that_predicts_it():
    masks = torch.zeros(3, 1, 16, 16)
    masks[0, 0, :8] = 1
    masks[1, 0, 8:] = 1
    outputs = {"pred_logits": torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]]),
               "pred_masks": torch.stack([m[0] * 20 - 10 for m in masks[[1, 2, 0]]])[None]}
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks[:2, 0].bool()}]
    (rows, cols), = HungarianMatcher(num_points=256)(outputs, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}


def merged_state(seed: int, policy: str, images: slice = slice(None)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1 + 24, 8, generator=g, dtype=torch.float64)
    x[0, 1:13] = x[0, 1:2] + 0.05 * x[0, 1:13]  # a similar region that merges (in the first image only)
    x = x[images]
    state = MergeState.initial(x.shape[0], (4, 6), 1, x.device, torch.float64)
    x, state = local_merge(x, state, (2, 2), FixedLevel(fraction=0.5) if policy == "min" else 0.9, policy, 1)
    x, state = global_merge(x, state, FixedLevel(fraction=0.4) if policy == "min" else 0.3, policy, 2)
    return x, state


def test_cross_attention_to_merged_tokens_with_log_size_bias_equals_attention_to_the_unmerged_grid():
    x, state = merged_state(0, "min")
    attention = AttentionWithPos(8, 2).double().eval()
    queries = torch.randn(5, 2, 8, dtype=torch.float64)
    tokens = x[:, 1:]
    bias = state.sizes[:, 1:].double().log()[:, None, :].expand(-1, 5, -1).repeat_interleave(2, dim=0)
    merged = attention(queries, tokens.transpose(0, 1), tokens.transpose(0, 1), None, None, bias)
    grid = state.unmerge_patches(tokens).transpose(0, 1)
    expected = attention(queries, grid, grid, None, None)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)


def test_merged_token_decoder_on_a_padded_per_image_batch_equals_each_image_alone():
    torch.manual_seed(0)
    decoder = MergedTokenMaskedTransformerDecoder(in_channels=8, num_classes=3, hidden_dim=16, num_queries=4,
                                                  num_heads=2, ffn_dim=32, num_layers=2, mask_dim=16).double()
    x, state = merged_state(1, "per_image")
    assert state.padded
    out = decoder(x[:, 1:], state)
    assert out["pred_masks"].shape == (2, 4, 4, 6) and len(out["aux_outputs"]) == 2
    for i in range(2):
        x_alone, state_alone = merged_state(1, "per_image", slice(i, i + 1))
        alone = decoder(x_alone[:, 1:], state_alone)
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(out[key][i:i + 1], alone[key], rtol=1e-9, atol=1e-9)
    sum(v.sum() for v in (out["pred_logits"], out["pred_masks"])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in decoder.parameters())


def test_plain_vit_mask2former_unmerges_after_the_decoder():
    cfg = eva_cfg("configs/demo/segmenter_tiny_algm.yaml", "MODEL.META_ARCHITECTURE", "MergedTokenMask2Former",
                  "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MergedTokenMaskedTransformerDecoder",
                  "MODEL.MASK_FORMER.HIDDEN_DIM", "64", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
                  "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
                  "MODEL.MASK_FORMER.DEC_LAYERS", "3", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
                  "MODEL.SEM_SEG_HEAD.MASK_DIM", "64", "MODEL.ALGM.LOCAL_THRESHOLD", "fraction:0.5")
    torch.manual_seed(0)
    model = build_model(cfg)
    losses = model(batch(64, 96, True))
    assert "loss_dice_1" in losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(batch(64, 96, False)[:1])[0]["sem_seg"]
    assert out.shape == (6, 64, 96)
    assert model.merge_stats["tokens_per_layer"][-1][0] < 1 + 24


def test_a_masked_everywhere_query_attends_everywhere():
    torch.manual_seed(0)
    model = build_model(eva_cfg()).eval()
    head = model.net.decode_head
    with torch.no_grad():
        head.mask_embed[4].weight.zero_()
        head.mask_embed[4].bias.fill_(-10.0)  # every mask logit very negative: every query blocked everywhere
        scores = model.net(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(scores).all()


def mmcv_checkpoint(model, path: Path) -> None:
    """EVA's layout: mmcv's {"meta": ..., "state_dict": {backbone.*, decode_head.*}}."""
    torch.save({"meta": {"mmseg_version": "0.20.2", "CLASSES": ("a", "b")},
                "state_dict": model.net.state_dict()}, path)


def test_checkpoint_in_evas_layout_loads_strictly_and_mismatches_are_listed(tmp_path):
    torch.manual_seed(0)
    source = build_model(eva_cfg())
    mmcv_checkpoint(source, tmp_path / "eva_tiny.pth")
    torch.manual_seed(1)
    target = build_model(eva_cfg())
    load_model_weights(target, tmp_path / "eva_tiny.pth")
    for (name, a), b in zip(source.net.state_dict().items(), target.net.state_dict().values()):
        assert torch.equal(a, b), name
    state = source.net.state_dict()
    state.pop("decode_head.query_feat.weight")
    state["backbone.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 4)
    state["decode_head.cls_embed.weight"] = torch.zeros(151, 32)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_weights(target, tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing (1): decode_head.query_feat.weight" in message
    assert "unexpected (1): backbone.blocks.0.attn.relative_position_bias_table" in message
    assert "decode_head.cls_embed.weight: checkpoint (151, 32) vs model (7, 32)" in message


def test_eval_only_through_train_net_with_a_checkpoint_in_evas_layout(tmp_path):
    """EVA's test pipeline at tiny size: short side resized, then each side up to a multiple of 32 (100 → 128),
    bf16 autocast inference."""
    torch.manual_seed(0)
    mmcv_checkpoint(build_model(eva_cfg("configs/demo/eva_tiny_algm.yaml")), tmp_path / "eva_tiny.pth")
    command = [sys.executable, str(ROOT / "train_net.py"), "--eval-only", "--config-file",
               str(ROOT / "configs/demo/eva_tiny_algm.yaml"), "MODEL.WEIGHTS", str(tmp_path / "eva_tiny.pth"),
               "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "TEST.PRECISION", "bf16",
               "INPUT.MIN_SIZE_TEST", "100", "INPUT.SIZE_DIVISIBILITY_TEST", "32", "DATASETS.TEST_MAX_IMAGES", "8",
               "OUTPUT_DIR", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


    report = json.loads((tmp_path / "out" / "eval" / "inference" / "results.json").read_text())["demo_shapes_val"]
    assert 0 <= report["sem_seg"]["mIoU"] <= 100
    assert report["tokens"]["algm_layers"]["global"]["kept_ratio"] < 1


def test_tiny_eva_fine_tunes_under_zero3_bf16_with_layer_decay(tmp_path):
    """The fine-tuning path of configs/ade20k/eva*.yaml at tiny size: DeepSpeed ZeRO-3 in bf16 (parameters gathered
    module by module: embedding tables and attention modules must be read through their own calls)."""
    command = [sys.executable, str(ROOT / "train_net.py"), "--config-file", str(ROOT / "configs/demo/eva_tiny_algm.yaml"),
               "MODEL.DEVICE", "cpu", "DEEPSPEED.ZERO_STAGE", "3", "DEEPSPEED.PRECISION", "bf16", "SOLVER.MAX_ITER",
               "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.LOG_PERIOD", "1", "SOLVER.LAYER_DECAY", "0.9",
               "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "z3")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


    records = [json.loads(line) for line in (tmp_path / "z3" / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "z3" / "model_final.pth").is_file()
