"""Segmenter with ALGM, the release checkpoint format, and the detectron2-style wrapper around it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from algm_d2.checkpoint import (
    CheckpointMismatchError, build_from_variant, load_model, load_model_weights, save_release_checkpoint,
)
from algm_d2.config import get_cfg
from algm_d2.merge import ALGMConfig
from algm_d2.modeling import SEGMENTER_VARIANTS, SegmentationModel, build_model, build_segmenter_vit
from algm_d2.modeling.meta_arch.segmentation_model import sliding_window_anchors


def variant(decoder: str = "mask_transformer", n_cls: int = 5) -> dict:
    return {
        "net_kwargs": {"image_size": (64, 64), "patch_size": 16, "d_model": 64, "n_heads": 2, "n_layers": 6,
                       "normalization": "vit", "distilled": False, "backbone": "vit_tiny_patch16_384",
                       "decoder": {"name": decoder, "n_layers": 2, "drop_path_rate": 0.0, "dropout": 0.1},
                       "n_cls": n_cls, "dropout": 0.0, "drop_path_rate": 0.1},
        "dataset_kwargs": {"crop_size": 64, "normalization": "vit"},
    }


def release_state_dict(model) -> dict:
    """What a release checkpoint holds: our keys under the release's names (our ``backbone`` is its ``encoder``) plus
    the encoder's ImageNet head."""
    state = {("encoder." + k[len("backbone."):] if k.startswith("backbone.") else k): v
             for k, v in model.state_dict().items()}
    dim = model.backbone.embed_dim
    state["encoder.head.weight"] = torch.randn(1000, dim)
    state["encoder.head.bias"] = torch.randn(1000)
    return state


@pytest.fixture()
def release_dir(tmp_path):
    torch.manual_seed(0)
    model = build_from_variant(variant())
    save_release_checkpoint(model, tmp_path, variant())
    torch.save({"model": release_state_dict(model)}, tmp_path / "checkpoint.pth")
    return tmp_path, model


@pytest.mark.parametrize("decoder", ["mask_transformer", "linear"])
def test_release_format_round_trip(tmp_path, decoder):
    torch.manual_seed(0)
    model = build_from_variant(variant(decoder)).eval()
    save_release_checkpoint(model, tmp_path, variant(decoder))
    loaded = load_model(tmp_path / "checkpoint.pth")
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_the_release_names_the_backbone_encoder_in_files_and_both_layouts_load(tmp_path):
    """save_release_checkpoint writes the release's key names (``encoder.*``); files in the release's layout or in
    ours (``backbone.*``) load through load_model and through the network's own load_state_dict."""
    torch.manual_seed(0)
    model = build_from_variant(variant()).eval()
    save_release_checkpoint(model, tmp_path, variant())
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert any(k.startswith("encoder.blocks.") for k in saved) and not any(k.startswith("backbone.") for k in saved)
    assert set(saved) == {"encoder." + k[len("backbone."):] if k.startswith("backbone.") else k
                          for k in model.state_dict()}
    fresh = build_from_variant(variant())
    fresh.load_state_dict(saved)  # the release's names, straight into the network
    assert torch.equal(fresh.backbone.pos_embed, model.backbone.pos_embed)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pth")  # our names
    assert torch.equal(load_model(tmp_path / "checkpoint.pth").backbone.pos_embed, model.backbone.pos_embed)


def test_imagenet_head_is_dropped_knowingly(release_dir, caplog):
    directory, model = release_dir
    with caplog.at_level("INFO"):
        loaded = load_model(directory / "checkpoint.pth")
    assert "encoder.head.weight" in caplog.text
    torch.testing.assert_close(loaded.backbone.blocks[0].attn.qkv.weight, model.backbone.blocks[0].attn.qkv.weight)


def test_mismatched_checkpoints_list_every_key(tmp_path, release_dir):
    directory, model = release_dir
    state = release_state_dict(model)
    del state["decoder.cls_emb"]
    state["decoder.extra"] = torch.zeros(1)
    state["encoder.pos_embed"] = torch.zeros(1, 7, 64)
    torch.save({"model": state}, directory / "checkpoint.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(directory / "checkpoint.pth")
    message = str(err.value)
    assert "decoder.cls_emb" in message and "decoder.extra" in message and "encoder.pos_embed" in message
    assert "checkpoint.pth" in message


def test_weights_only_by_default(tmp_path, release_dir):
    directory, model = release_dir
    torch.save({"model": release_state_dict(model), "args": SimpleArgs()}, directory / "checkpoint.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_model(directory / "checkpoint.pth")
    assert load_model(directory / "checkpoint.pth", weights_only=False) is not None


class SimpleArgs:
    """A pickled non-tensor object, as some training scripts store next to the weights."""


def test_missing_variant_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="variant.yml"):
        load_model(tmp_path / "checkpoint.pth")


def test_release_api_with_algm_and_merge_stats(release_dir):
    directory, _ = release_dir
    algm = ALGMConfig(local_layer=1, global_layer=5, window=(2, 2), local_threshold=-1.0,
                      global_threshold="batch_stats", batch_policy="min")
    model = load_model(directory / "checkpoint.pth", algm=algm)
    logits = model(torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 5, 64, 64)
    counts = model.merge_stats["tokens_per_layer"]
    assert len(counts) == 6 and all(len(layer) == 3 for layer in counts)
    assert counts[0] == [1 + 4] * 3  # 4x4 grid, every 2x2 window merged, class token counted
    assert model.merge_stats["initial_tokens"] == 17


def test_images_not_multiple_of_the_patch_are_padded_like_the_release(release_dir):
    directory, _ = release_dir
    model = load_model(directory / "checkpoint.pth")
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        logits = model(x)
        padded = F.pad(x, (0, 10, 0, 14))
        masks = model.decoder(*_split(model.backbone(padded)))
        expected = F.interpolate(masks, size=(64, 80), mode="bilinear", align_corners=False)[..., :50, :70]
    assert logits.shape == (1, 5, 50, 70)
    torch.testing.assert_close(logits, expected)


def _split(encoded):
    tokens, state = encoded
    return tokens[:, state.num_prefix:], state


@pytest.mark.parametrize("packed", [True, False])
def test_per_image_batch_equals_one_image_per_forward(release_dir, packed, monkeypatch):
    """Per-image merging equals running each image alone: packed (valid tokens only, variable-length attention in
    encoder and mask-transformer decoder) and padded (key masks)."""
    directory, _ = release_dir
    algm = ALGMConfig(local_layer=1, global_layer=3, local_threshold=0.3, global_threshold="batch_stats",
                      batch_policy="per_image")
    model = load_model(directory / "checkpoint.pth", algm=algm)
    model.backbone.packed_attention = model.decoder.packed_attention = packed
    layouts = []
    find_layout = type(model.decoder)._packed_layout
    monkeypatch.setattr(type(model.decoder), "_packed_layout",
                        lambda self, state: layouts.append(find_layout(self, state)) or layouts[-1])
    torch.manual_seed(1)
    flat = torch.zeros(1, 3, 64, 64) + torch.randn(1, 3, 1, 1)
    images = torch.cat([flat, torch.randn(1, 3, 64, 64), flat + 0.3 * torch.randn(1, 3, 64, 64)])
    with torch.no_grad():
        batched = model(images)
        counts = model.merge_stats["tokens_per_layer"]
        alone = torch.cat([model(images[i:i + 1]) for i in range(3)])
    assert len(set(counts[-1])) > 1, "the test needs images that keep different token counts"
    # the batch's decoder ran packed exactly when asked: images' tokens + 5 class tokens back to back
    assert (layouts[0] is not None) == packed and all(layout is None for layout in layouts[1:])
    if packed:
        assert layouts[0].cu_seqlens.diff().tolist() == [n + 5 - 1 for n in counts[-1]]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_segmenter_variants_have_the_published_sizes(name):
    sizes = SEGMENTER_VARIANTS[name]
    with torch.device("meta"):
        vit = build_segmenter_vit(img_size=512, **sizes)
    c, depth = sizes["embed_dim"], sizes["depth"]
    # patch conv + cls + pos (1024 cells + cls) + blocks (qkv, proj, fc1, fc2, 2 norms) + final norm
    expected = (3 * 256 * c + c) + c + 1025 * c + depth * (12 * c * c + 13 * c) + 2 * c
    assert sum(p.numel() for p in vit.parameters()) == expected
    assert round(expected / 1e6, 1) == {"tiny": 5.7, "small": 22.0, "base": 86.4, "large": 304.1}[name]


def tiny_cfg():
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.merge_from_list(["IMG_SIZE", 64, "EMBED_DIM", 64, "DEPTH", 4, "NUM_HEADS", 2])
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.ALGM.merge_from_list(["ENABLED", True, "GLOBAL_LAYER", 3, "LOCAL_THRESHOLD", 0.0])
    return cfg


def test_segmentation_model_trains_and_infers():
    cfg = tiny_cfg()
    model = build_model(cfg)
    batch = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
              "sem_seg": torch.randint(0, 4, (64, 64))} for _ in range(2)]
    batch[0]["sem_seg"][:10] = 255
    losses = model(batch)
    losses["loss_sem_seg"].backward()
    assert model.net.backbone.blocks[0].attn.qkv.weight.grad is not None
    model.eval()
    out = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "height": 80, "width": 120}])
    probs = out[0]["sem_seg"]
    assert probs.shape == (4, 80, 120)
    torch.testing.assert_close(probs.sum(0), torch.ones(80, 120))


def test_sliding_window_matches_whole_image_when_one_crop_covers_it():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    whole = build_model(cfg).eval()
    cfg.TEST.merge_from_list(["MODE", "slide", "CROP_SIZE", 64, "STRIDE", 32])
    slide = SegmentationModel.from_config(cfg).eval()
    slide.net.load_state_dict(whole.net.state_dict())
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(slide([{"image": image}])[0]["sem_seg"], whole([{"image": image}])[0]["sem_seg"])
    slide([{"image": torch.randint(0, 255, (3, 64, 160), dtype=torch.uint8)}])
    assert len(slide.merge_stats["tokens_per_layer"][0]) == 4  # crops at x = 0, 32, 64 and flush with the end: 96
    assert sliding_window_anchors(160, 64, 32) == [0, 32, 64, 96]
    assert sliding_window_anchors(150, 64, 64) == [0, 64, 86]
    assert sliding_window_anchors(50, 64, 64) == [0]


def test_model_weights_load_release_and_own_checkpoints(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    other = copy.deepcopy(model)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    torch.save({"model": other.state_dict()}, tmp_path / "ours.pth")
    load_model_weights(model, tmp_path / "ours.pth")
    torch.testing.assert_close(model.net.decoder.cls_emb, other.net.decoder.cls_emb)
    state = dict(other.net.state_dict())
    state["encoder.head.weight"] = torch.zeros(1000, 64)
    torch.save({"model": state}, tmp_path / "release.pth")
    load_model_weights(model, tmp_path / "release.pth")
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    with pytest.raises(CheckpointMismatchError, match="mask_norm.weight"):
        load_model_weights(build_model(cfg), tmp_path / "release.pth")


def test_bad_algm_config_values_name_the_key():
    cfg = tiny_cfg()
    cfg.MODEL.ALGM.GLOBAL_THRESHOLD = "median"
    with pytest.raises(ValueError, match="MODEL.ALGM.GLOBAL_THRESHOLD"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.MODEL.ALGM.GLOBAL_LAYER = 9
    with pytest.raises(ValueError, match="global_layer=9"):
        build_model(cfg)
