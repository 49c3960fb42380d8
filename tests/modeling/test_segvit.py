"""SegViT with ALGM: the ATM decoder (shapes, training, the release's computation), attention to merged tokens with
the log-size bias == attention to the unmerged grid, and strict loading of the release's mmseg key layout."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from algm_d2.checkpoint import CheckpointMismatchError, load_model_weights
from algm_d2.config import get_cfg
from algm_d2.modeling import build_model
from algm_d2.modeling.backbone.taps import Tap
from algm_d2.modeling.heads.atm_head import ATMHead, ATMLoss
from algm_d2.modeling.mask2former import semantic_to_instance_targets

from .test_setr import CLASSES, DIM, assert_full_size_layout, batch, merged_tap, setr_cfg, unmerged


def segvit_cfg(algm: bool = False):
    cfg = get_cfg()
    cfg.merge_from_file("configs/demo/segvit_tiny_algm.yaml" if algm else "configs/demo/segvit_tiny.yaml")
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(CLASSES), "MODEL.BACKBONE.EMBED_DIM", str(DIM),
                         "MODEL.BACKBONE.NUM_HEADS", "2", "MODEL.BACKBONE.IMG_SIZE", "64",
                         "MODEL.SEGVIT.EMBED_DIM", "16", "MODEL.SEGVIT.NUM_HEADS", "2"])
    if algm:
        cfg.MODEL.ALGM.LOCAL_THRESHOLD = "fraction:0.5"
    return cfg


@pytest.mark.parametrize("algm", [False, True])
def test_segvit_trains_and_predicts_at_a_non_square_size(algm):
    torch.manual_seed(0)
    model = build_model(segvit_cfg(algm))
    losses = model(batch(64, 80))
    assert set(losses) == {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(batch(64, 80)[:1])[0]["sem_seg"]
    assert out.shape == (CLASSES, 64, 80) and (out >= 0).all()
    kept = model.merge_stats["tokens_per_layer"]
    assert len(kept) == 6 and (kept[-1][0] < 20 if algm else kept[-1][0] == 20)


def tiny_head(seed: int = 0) -> ATMHead:
    torch.manual_seed(seed)
    return ATMHead(in_channels=DIM, num_classes=CLASSES, embed_dim=16, num_heads=2, num_layers=2,
                   num_stages=3).double().eval()


@pytest.mark.parametrize("policy", ["min", "per_image"])
def test_atm_on_merged_tokens_with_log_size_bias_equals_atm_on_the_unmerged_grid(policy):
    head = tiny_head()
    taps = [merged_tap(seed, policy) for seed in range(3)]
    assert all(t.state.merged for t in taps) and (policy == "min" or taps[0].state.padded)
    merged = head(taps)
    expected = head([unmerged(t) for t in taps])
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-10, atol=1e-10)
        for a, b in zip(merged["aux_outputs"], expected["aux_outputs"]):
            torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)


def release_atm(head: ATMHead, token_layers: list, grid: tuple) -> dict:
    """zbwxp/SegVit ATMHead.forward (TPN_Decoder over torch's post-norm decoder layer) on per-layer tokens."""
    sd = head.state_dict()
    b = token_layers[0].shape[0]
    q = sd["q.weight"].repeat(b, 1, 1).transpose(0, 1)  # [Q, B, C]
    attns, qs = [], []
    for i, x in enumerate(reversed(token_layers), start=1):
        lateral = F.layer_norm(F.linear(x, sd[f"input_proj_{i}.weight"], sd[f"input_proj_{i}.bias"]), (16,),
                               sd[f"proj_norm_{i}.weight"], sd[f"proj_norm_{i}.bias"])
        memory = lateral.transpose(0, 1)
        for j in range(2):
            p = f"decoder_{i}.layers.{j}."
            self_attn = torch.nn.MultiheadAttention(16, 2).double().eval()
            self_attn.load_state_dict({k[len(p + "self_attn."):]: v for k, v in sd.items()
                                       if k.startswith(p + "self_attn.")})
            tgt = q
            tgt = F.layer_norm(tgt + self_attn(tgt, tgt, tgt)[0], (16,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
            xq, xk = tgt.transpose(0, 1), memory.transpose(0, 1)

            def lin(x, name):
                return F.linear(x, sd[p + f"multihead_attn.{name}.weight"], sd[p + f"multihead_attn.{name}.bias"])

            qh = lin(xq, "q").reshape(b, -1, 2, 8).permute(0, 2, 1, 3)
            kh = lin(xk, "k").reshape(b, -1, 2, 8).permute(0, 2, 1, 3)
            vh = lin(xk, "v").reshape(b, -1, 2, 8).permute(0, 2, 1, 3)
            attn = (qh @ kh.transpose(-2, -1)) * 8 ** -0.5
            out = (attn.softmax(-1) @ vh).transpose(1, 2).reshape(b, -1, 16)
            tgt2 = lin(out, "proj").transpose(0, 1)
            tgt = F.layer_norm(tgt + tgt2, (16,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
            ffn = F.linear(F.relu(F.linear(tgt, sd[p + "linear1.weight"], sd[p + "linear1.bias"])),
                           sd[p + "linear2.weight"], sd[p + "linear2.bias"])
            q = F.layer_norm(tgt + ffn, (16,), sd[p + "norm3.weight"], sd[p + "norm3.bias"])
            last = attn.sum(dim=1) / 2
        attns.append(last.transpose(-1, -2).transpose(1, 2).reshape(b, -1, *grid))
        qs.append(q.transpose(0, 1))
    classes = [F.linear(x, sd["class_embed.weight"], sd["class_embed.bias"]) for x in qs]
    masks = [attns[0]]
    for a in attns[1:]:
        masks.append(masks[-1] + a)
    return {"pred_logits": classes[-1], "pred_masks": masks[-1], "aux_logits": classes[:-1], "aux_masks": masks[:-1]}


def test_atm_head_computes_what_the_release_computes():
    head = tiny_head(1)
    layers = [torch.randn(2, 12, DIM, dtype=torch.float64) for _ in range(3)]
    state = merged_tap().state.__class__.initial(2, (3, 4), 0, layers[0].device, torch.float64)
    ours = head([Tap(x, state) for x in layers])
    expected = release_atm(head, layers, (3, 4))
    torch.testing.assert_close(ours["pred_logits"], expected["pred_logits"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours["pred_masks"], expected["pred_masks"], rtol=1e-10, atol=1e-10)
    for aux, logits, masks in zip(ours["aux_outputs"], expected["aux_logits"], expected["aux_masks"]):
        torch.testing.assert_close(aux["pred_logits"], logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(aux["pred_masks"], masks, rtol=1e-10, atol=1e-10)


def test_atm_loss_matches_hand_computed_values():
    loss = ATMLoss(num_classes=2, no_object_weight=0.5, mask_weight=20.0)
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # query k predicts class k
    masks = torch.tensor([[[[3.0, -3.0]], [[0.0, 0.0]]]])  # [B, Q, 1, 2]
    label = torch.tensor([[0, 255]])  # class 0 on the left pixel, the right one ignored
    out = loss({"pred_logits": logits, "pred_masks": masks}, [semantic_to_instance_targets(label, 255)])
    # CE: query 0 → class 0 (weight 1), query 1 → no object (weight 0.5), weighted mean
    ce0 = -torch.log_softmax(logits[0, 0], 0)[0]
    ce1 = -torch.log_softmax(logits[0, 1], 0)[2]
    torch.testing.assert_close(out["loss_ce"], (ce0 + 0.5 * ce1) / 1.5)
    # one matched mask (query 0) against [1, 0]: focal mean over the 2 pixels, dice with +1 smoothing
    p = torch.sigmoid(torch.tensor([3.0, -3.0]))
    t = torch.tensor([1.0, 0.0])
    ce = F.binary_cross_entropy(p, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * t + 0.75 * (1 - t))).mean()
    torch.testing.assert_close(out["loss_mask"], 20.0 * focal)
    torch.testing.assert_close(out["loss_dice"], 1 - (2 * p[0] + 1) / (p.sum() + 1 + 1))


def release_shapes(*, dim: int = DIM, depth: int = 6, grid: int = 4, d: int = 16, layers: int = 2,
                   classes: int = CLASSES) -> dict:
    """Key → shape of a zbwxp/SegVit checkpoint (mmseg 0.24 ``VisionTransformer`` + ``ATMHead`` over torch's
    ``TransformerDecoderLayer``, ``ATMLoss``'s criterion buffer), written from the release's module names."""
    shapes = {"backbone.cls_token": (1, 1, dim), "backbone.pos_embed": (1, 1 + grid * grid, dim),
              "backbone.patch_embed.projection.weight": (dim, 3, 16, 16), "backbone.patch_embed.projection.bias": (dim,)}
    for i in range(depth):
        p = f"backbone.layers.{i}."
        shapes.update({p + "ln1.weight": (dim,), p + "ln1.bias": (dim,), p + "attn.attn.in_proj_weight": (3 * dim, dim),
                       p + "attn.attn.in_proj_bias": (3 * dim,), p + "attn.attn.out_proj.weight": (dim, dim),
                       p + "attn.attn.out_proj.bias": (dim,), p + "ln2.weight": (dim,), p + "ln2.bias": (dim,),
                       p + "ffn.layers.0.0.weight": (4 * dim, dim), p + "ffn.layers.0.0.bias": (4 * dim,),
                       p + "ffn.layers.1.weight": (dim, 4 * dim), p + "ffn.layers.1.bias": (dim,)})
    for i in (1, 2, 3):
        shapes.update({f"decode_head.input_proj_{i}.weight": (d, dim), f"decode_head.input_proj_{i}.bias": (d,),
                       f"decode_head.proj_norm_{i}.weight": (d,), f"decode_head.proj_norm_{i}.bias": (d,)})
        for j in range(layers):
            p = f"decode_head.decoder_{i}.layers.{j}."
            shapes.update({p + "self_attn.in_proj_weight": (3 * d, d), p + "self_attn.in_proj_bias": (3 * d,),
                           p + "self_attn.out_proj.weight": (d, d), p + "self_attn.out_proj.bias": (d,),
                           p + "linear1.weight": (4 * d, d), p + "linear1.bias": (4 * d,),
                           p + "linear2.weight": (d, 4 * d), p + "linear2.bias": (d,)})
            shapes.update({p + f"multihead_attn.{n}.{k}": (d, d) if k == "weight" else (d,)
                           for n in ("q", "k", "v", "proj") for k in ("weight", "bias")})
            shapes.update({p + f"norm{n}.{k}": (d,) for n in (1, 2, 3) for k in ("weight", "bias")})
    shapes.update({"decode_head.q.weight": (classes, d), "decode_head.class_embed.weight": (classes + 1, d),
                   "decode_head.class_embed.bias": (classes + 1,),
                   "decode_head.loss_decode.criterion.empty_weight": (classes + 1,)})
    return shapes


def release_layout() -> dict:
    g = torch.Generator().manual_seed(2)
    return {k: torch.randn(s, generator=g) for k, s in release_shapes().items()}


def test_full_size_config_takes_the_releases_keys_and_shapes():
    release = release_shapes(dim=1024, depth=24, grid=40, d=512, layers=3, classes=150)
    assert_full_size_layout("configs/ade20k/segvit/segvit_vit_large_atm_640x640_160k_algm.yaml", release)


def test_checkpoint_in_the_release_layout_loads_strictly_and_blocks_compute_as_mmseg(tmp_path, caplog):
    torch.manual_seed(0)
    model = build_model(segvit_cfg())
    release = release_layout()
    torch.save({"meta": {"CLASSES": ("a",)}, "state_dict": release}, tmp_path / "segvit.pth")
    with caplog.at_level("INFO"):
        load_model_weights(model, tmp_path / "segvit.pth")
    assert "decode_head.loss_decode.criterion.empty_weight" in caplog.text and "backbone.cls_token" in caplog.text
    net = model.net
    torch.testing.assert_close(net.backbone.pos_embed.data, release["backbone.pos_embed"][:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(net.decode_head.decoder_2.layers[1].multihead_attn.k.weight.data,
                               release["decode_head.decoder_2.layers.1.multihead_attn.k.weight"], rtol=0, atol=0)
    # block 2 as mmseg's TransformerEncoderLayer computes it: x + MHA(ln1(x)), then + FFN(ln2(x)) (in float64)
    p = "backbone.layers.2."
    w = {k[len(p):]: v.double() for k, v in release.items() if k.startswith(p)}
    mha = torch.nn.MultiheadAttention(DIM, 2, batch_first=True).double().eval()
    mha.load_state_dict({k[len("attn.attn."):]: v for k, v in w.items() if k.startswith("attn.attn.")})
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    h = F.layer_norm(x, (DIM,), w["ln1.weight"], w["ln1.bias"], 1e-6)
    x1 = x + mha(h, h, h)[0]
    h = F.layer_norm(x1, (DIM,), w["ln2.weight"], w["ln2.bias"], 1e-6)
    fc1 = F.linear(h, w["ffn.layers.0.0.weight"], w["ffn.layers.0.0.bias"])
    expected = x1 + F.linear(F.gelu(fc1), w["ffn.layers.1.weight"], w["ffn.layers.1.bias"])
    block = net.backbone.blocks[2].double().eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
    net.float()

    release.pop("decode_head.q.weight")
    release["backbone.layers.0.ln1.weight"] = torch.zeros(DIM + 1)
    torch.save({"state_dict": release}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_weights(model, tmp_path / "bad.pth")
    assert "missing (1): decode_head.q.weight" in str(err.value)
    assert f"backbone.blocks.0.norm1.weight: checkpoint ({DIM + 1},) vs model ({DIM},)" in str(err.value)


def test_out_indices_must_match_the_decoders():
    cfg = segvit_cfg()
    cfg.MODEL.SEGVIT.OUT_INDICES = (5, 3, 1)
    with pytest.raises(ValueError, match="OUT_INDICES must be increasing"):
        build_model(cfg)


def test_benchmark_tool_times_a_network_from_its_config_plain_and_with_algm(tmp_path):
    from ..test_tools import load_tool

    load_tool("benchmark").main(["--config-file", "configs/demo/segvit_tiny.yaml", "--image-size", "64",
                                 "--batch-size", "2", "--num-images", "2", "--precision", "fp32", "--warmup", "1",
                                 "--iters", "2", "--rounds", "1", "--flops-images", "1", "--device", "cpu",
                                 "--settings", "baseline", "paper_level", "--protocols", "repeat", "--global-layer",
                                 "3", "--output-dir", str(tmp_path), "MODEL.BACKBONE.EMBED_DIM", "32",
                                 "MODEL.SEGVIT.EMBED_DIM", "16"])
    report = json.loads((tmp_path / "benchmark.json").read_text())
    base, merged = report["results"]["baseline"], report["results"]["paper_level"]
    assert base["protocols"]["repeat"]["images_per_second"] > 0
    assert merged["gflops_per_image"] < base["gflops_per_image"]
    assert report["config"]["model"] == "configs/demo/segvit_tiny.yaml"


def test_imagenet_weights_initialise_a_vit_without_class_token(tmp_path):
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    from algm_d2.checkpoint import load_pretrained_vit

    torch.manual_seed(0)
    imagenet = VisionTransformer(img_size=48, patch_size=16, embed_dim=DIM, depth=6, num_heads=2, num_classes=10)
    torch.save(imagenet.state_dict(), tmp_path / "vit.pth")  # 1 + 3x3 positions, a class token and a classifier
    net = build_model(segvit_cfg()).net  # 64x64: a 4x4 grid without class token
    load_pretrained_vit(net.backbone, tmp_path / "vit.pth")
    # the patch positions only, resized as timm resizes them (its filter)
    expected = resample_abs_pos_embed(imagenet.pos_embed[:, 1:].detach(), (4, 4), num_prefix_tokens=0)
    torch.testing.assert_close(net.backbone.pos_embed.data, expected)
    torch.testing.assert_close(net.backbone.blocks[4].mlp.fc1.weight, imagenet.blocks[4].mlp.fc1.weight)


@pytest.mark.parametrize("config", ["segvit", "setr_mla"])
def test_a_padded_per_image_batch_gives_each_image_its_own_result(config):
    cfg = segvit_cfg(algm=True) if config == "segvit" else setr_cfg("mla", algm=True)
    cfg.merge_from_list(["MODEL.ALGM.BATCH_POLICY", "per_image", "MODEL.ALGM.LOCAL_THRESHOLD", "0.5",
                         "MODEL.ALGM.GLOBAL_THRESHOLD", "0.3"])
    torch.manual_seed(0)
    net = build_model(cfg).net.double().eval()
    images = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    images[0, :, :32] = images[0, :, :1, :1]  # a flat region: the first image merges more
    with torch.no_grad():
        both = net(images)
        kept = net.merge_stats["tokens_per_layer"][-1]
        alone = torch.cat([net(images[i:i + 1]) for i in range(2)])
    assert kept[0] < kept[1] < 20  # neither ViT has a class token
    # merges sum in float32 whatever the dtype: agreement to float32 rounding
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-7)
