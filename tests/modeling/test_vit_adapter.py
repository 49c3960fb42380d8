"""ViT-Adapter with ALGM: the merged-token injector/extractor equal unmerge → op → re-merge, shapes, no-merge = base,
the held ViT's names and state, and the outputs against stored fingerprints."""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from timm.models.eva import Eva
from torch import nn

from algm_d2.config import get_cfg
from algm_d2.merge import OFF, ALGMConfig, FixedLevel, MergeState, global_merge, local_merge
from algm_d2.modeling.backbone.vit_adapter import Extractor, Injector, ViTAdapter, reference_points, slot_mean

DIM, HEADS = 24, 4
GRID = (4, 6)
LEVELS = [(8, 12), (4, 6), (2, 3)]


def merged_tokens(seed: int, policy: str):
    """A float64 batch of [class, 4×6 patches] merged by CLAP then GBM (per-image counts differ under per_image)."""
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    centres = torch.randn(2, 3, DIM, generator=g, dtype=torch.float64)
    assign = torch.randint(0, 3, (2, n), generator=g)
    x = torch.cat([torch.randn(2, 1, DIM, generator=g, dtype=torch.float64),
                   centres.gather(1, assign[..., None].expand(-1, -1, DIM))
                   + 0.3 * torch.randn(2, n, DIM, generator=g, dtype=torch.float64)], dim=1)
    x[1, 1:] += torch.randn(n, DIM, generator=g, dtype=torch.float64)  # the second image merges less
    state = MergeState.initial(2, GRID, 1, x.device, torch.float64)
    x, state = local_merge(x, state, (2, 2), 0.5, policy, 1)
    x, state = global_merge(x, state, FixedLevel(fraction=0.4), policy, 2)
    return x, state


def randomized(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module.double()


@pytest.mark.parametrize("policy", ["min", "per_image"])
def test_injector_on_merged_tokens_equals_unmerge_inject_remerge(policy):
    x, state = merged_tokens(0, policy)
    assert state.merged and int(state.num_tokens.min()) < 1 + GRID[0] * GRID[1]
    injector = randomized(Injector(dim=DIM, num_heads=HEADS, num_points=2, impl="reference"), 1)
    feat = torch.randn(2, sum(h * w for h, w in LEVELS), DIM, dtype=torch.float64)
    points = reference_points([GRID], x.device).double()
    merged = injector(x[:, 1:], state, points, feat, LEVELS)
    grid_tokens = state.unmerge_patches(x[:, 1:])
    unmerged = MergeState.initial(2, GRID, 1, x.device, torch.float64)
    expected = slot_mean(injector(grid_tokens, unmerged, points, feat, LEVELS), state)
    valid = (torch.arange(state.seq_len - 1) < (state.num_tokens - 1)[:, None])
    torch.testing.assert_close(merged[valid], expected[valid], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("policy", ["min", "per_image"])
def test_extractor_reading_merged_tokens_equals_reading_the_unmerged_grid(policy):
    x, state = merged_tokens(2, policy)
    extractor = randomized(Extractor(dim=DIM, num_heads=HEADS, num_points=2, impl="reference"), 3)
    c = torch.randn(2, sum(h * w for h, w in LEVELS), DIM, dtype=torch.float64)
    points = reference_points(LEVELS, x.device).double()
    merged = extractor(c, points, x[:, 1:], state, GRID, LEVELS)
    unmerged = MergeState.initial(2, GRID, 1, x.device, torch.float64)
    expected = extractor(c, points, state.unmerge_patches(x[:, 1:]), unmerged, GRID, LEVELS)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)


def test_slot_mean_averages_members_and_leaves_padding_zero():
    x, state = merged_tokens(4, "per_image")
    cells = torch.randn(2, GRID[0] * GRID[1], 3, dtype=torch.float64)
    means = slot_mean(cells, state)
    for b in range(2):
        slots = state.index_map[b] - 1
        for slot in range(int(state.num_tokens[b]) - 1):
            torch.testing.assert_close(means[b, slot], cells[b][slots == slot].mean(0))
        assert means[b, int(state.num_tokens[b]) - 1:].abs().sum() == 0


def tiny_adapter(algm: ALGMConfig = OFF, seed: int = 0) -> ViTAdapter:
    torch.manual_seed(seed)
    vit = Eva(img_size=64, patch_size=16, embed_dim=DIM, depth=4, num_heads=HEADS, mlp_ratio=2.0, num_classes=0,
              norm_layer=partial(nn.LayerNorm, eps=1e-6))
    model = ViTAdapter(vit=vit, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8,
                       deform_num_heads=HEADS, init_values=0.5, msda_impl="reference", algm=algm)
    return model.eval()


def test_adapter_pyramid_shapes_at_a_non_square_size_and_gradients():
    model = tiny_adapter(ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(fraction=0.5),
                                    global_threshold=FixedLevel(fraction=0.3))).train()
    images = torch.randn(2, 3, 96, 160)
    feats, state = model(images)
    assert [tuple(f.shape) for f in feats] == [(2, DIM, 24, 40), (2, DIM, 12, 20), (2, DIM, 6, 10), (2, DIM, 3, 5)]
    tokens = state.tokens_per_layer()
    assert tokens[0][0] < 1 + 60 and tokens[2][0] < tokens[0][0]
    sum(f.square().mean() for f in feats).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["interactions.2.injector.attn.sampling_offsets.weight"].abs().sum() > 0


def test_adapter_with_merges_that_keep_every_token_equals_the_base_model():
    base = tiny_adapter(OFF)
    # τ above any cosine: GBM merges nothing but reorders the tokens, so the merged-token paths run
    level0 = ALGMConfig(local_layer=1, global_layer=3, local_threshold=2.0, global_threshold=2.0)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected, _ = base(images)
        got, state = base(images, algm=level0)
    assert state.merged
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_adapter_rejects_sizes_and_interaction_ranges_that_do_not_fit():
    model = tiny_adapter()
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 64))
    vit = Eva(img_size=64, patch_size=16, embed_dim=DIM, depth=4, num_heads=HEADS, num_classes=0)
    with pytest.raises(ValueError, match="INTERACTION_INDEXES"):
        ViTAdapter(vit=vit, interaction_indexes=[[0, 1], [3, 3]])


def test_adapter_around_eva02_with_rope_merges_and_keeps_its_outputs_at_merge_level_zero():
    """EVA-02 (SwiGLU, sub-LN, RoPE at the merged tokens' mean positions) inside the adapter."""
    from algm_d2.modeling import build_eva

    torch.manual_seed(0)
    vit = build_eva(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=3, mlp_ratio=4 * 2 / 3, eva02=True,
                    rope_pretrain_grid=4)
    model = ViTAdapter(vit=vit, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8,
                       deform_num_heads=HEADS, init_values=0.5, msda_impl="reference").eval()
    images = torch.randn(2, 3, 64, 96)
    merging = ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(fraction=0.5),
                         global_threshold=FixedLevel(fraction=0.4))
    keep_all = ALGMConfig(local_layer=1, global_layer=3, local_threshold=2.0, global_threshold=2.0)
    with torch.no_grad():
        base, _ = model(images)
        merged, state = model(images, algm=merging)
        kept, _ = model(images, algm=keep_all)
    assert state.tokens_per_layer()[-1] == [13, 13]
    assert all(torch.isfinite(f).all() for f in merged)
    for a, b in zip(kept, base):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def tiny_eva02_adapter() -> ViTAdapter:
    from algm_d2.modeling import build_eva

    torch.manual_seed(0)
    vit = build_eva(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=3, mlp_ratio=4 * 2 / 3, eva02=True,
                    rope_pretrain_grid=4)
    return ViTAdapter(vit=vit, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8,
                      deform_num_heads=HEADS, init_values=0.5, msda_impl="reference").eval()


def test_adapter_names_are_the_vits_own_beside_its_parts_and_nothing_is_registered_twice():
    torch.manual_seed(0)
    vit = Eva(img_size=64, patch_size=16, embed_dim=DIM, depth=4, num_heads=HEADS, mlp_ratio=2.0, num_classes=0)
    vit_keys = [k for k in vit.state_dict() if not k.startswith(("norm.", "fc_norm."))]
    model = ViTAdapter(vit=vit, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8,
                       deform_num_heads=HEADS)
    keys = list(model.state_dict())
    # the module's own tensors first (the ViT's, then the level embedding), then the ViT's modules, then the adapter's
    own = ["cls_token", "pos_embed"]
    assert keys[:3] == own + ["level_embed"]
    assert keys[3:3 + len(vit_keys) - 2] == [k for k in vit_keys if k not in own]
    adapter_parts = [k.split(".")[0] for k in keys[1 + len(vit_keys):]]
    assert list(dict.fromkeys(adapter_parts)) == ["spm", "interactions", "up", "norm1", "norm2", "norm3", "norm4"]
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    assert set(names) <= set(keys)
    assert not any(isinstance(m, type(model.vit)) for m in model.modules())
    assert model.vit.blocks is model.blocks and model.vit.cls_token is model.cls_token


def test_held_vit_follows_the_adapters_mode_dtype_loads_and_merge_config():
    model = tiny_adapter()
    merging = ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(fraction=0.5),
                         global_threshold=FixedLevel(fraction=0.3))
    model.algm = merging
    assert model.vit.algm is merging and model.algm is merging
    model.train()
    assert model.vit.training and model.blocks.training
    model.eval()
    assert not model.vit.training and not model.blocks.training
    model.double()
    assert model.vit.cls_token is model.cls_token and model.vit.pos_embed.dtype == torch.float64
    state = {k: v.float() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert model.vit.pos_embed is model.pos_embed and torch.equal(model.vit.pos_embed, state["pos_embed"])



def test_activation_checkpointing_in_the_held_vit_recomputes_its_blocks_with_the_same_gradients(monkeypatch):
    import algm_d2.modeling.backbone.algm_vit as algm_vit

    calls = []
    checkpoint = algm_vit.checkpoint
    monkeypatch.setattr(algm_vit, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    images = torch.randn(1, 3, 64, 96)
    grads = []
    for recompute in (False, True):
        model = tiny_adapter(REFERENCE_MERGING).train()
        model.vit.activation_checkpointing = recompute
        sum(f.square().mean() for f in model(images)[0]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 2 * 4  # attention and MLP halves of each block, only when asked
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)

def test_networks_that_decode_vit_tokens_reject_the_adapter_by_its_config_key():
    from algm_d2.modeling.meta_arch.mask2former import MergedTokenMask2Former
    from algm_d2.modeling.meta_arch.segmenter import Segmenter

    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[2] / "configs/demo/eva_tiny.yaml"))
    for network in (Segmenter, MergedTokenMask2Former):
        with pytest.raises(ValueError, match="MODEL.BACKBONE.NAME: .*'ViTAdapter'"):
            network.from_config(cfg)


REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "vit_adapter_reference.json"
REFERENCE_MERGING = ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(fraction=0.5),
                               global_threshold=FixedLevel(fraction=0.3))


def reference_fingerprints() -> dict:
    """Per case: each pyramid level's per-channel mean and std (float64) and the kept tokens after each block."""
    cases = {}
    for name, build in (("eva01", tiny_adapter), ("eva02_rope", tiny_eva02_adapter)):
        model = build()
        for size in ((64, 64), (64, 96)):
            images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
            for setting, algm in (("off", OFF), ("merging", REFERENCE_MERGING)):
                with torch.no_grad():
                    feats, state = model(images, algm=algm)
                cases[f"{name}_{size[0]}x{size[1]}_{setting}"] = {
                    "levels": [[[float(f"{v:.8g}") for v in stat.tolist()]
                                for stat in (f.double().mean((0, 2, 3)), f.double().std((0, 2, 3)))] for f in feats],
                    "tokens_per_layer": state.tokens_per_layer()}
    return cases


def test_adapter_outputs_match_the_stored_fingerprints():
    """The tiny adapters (EVA-01; EVA-02 with RoPE), at the pretraining grid and another, unmerged and merging, give
    the pyramid recorded in tests/fixtures (rewrite it with ``python -m tests.modeling.test_vit_adapter`` only for an intended
    change of outputs)."""
    stored = json.loads(REFERENCE.read_text())
    got = reference_fingerprints()
    assert sorted(got) == sorted(stored)
    for case, expected in stored.items():
        assert got[case]["tokens_per_layer"] == expected["tokens_per_layer"], case
        for level, (mine, theirs) in enumerate(zip(got[case]["levels"], expected["levels"])):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, c=case, i=level: f"{c} level {i}: {m}")


if __name__ == "__main__":
    REFERENCE.write_text("{\n" + ",\n".join(f"{json.dumps(case)}: {json.dumps(value)}"
                                            for case, value in reference_fingerprints().items()) + "\n}\n")
    sys.exit(0)
