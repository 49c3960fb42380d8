"""SETR with ALGM: heads on tapped layers (shapes, training), the release's head semantics (functional references),
merged == unmerge → op, and strict loading of checkpoints in the release's key layout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from algm_d2.checkpoint import CheckpointMismatchError, load_model_weights
from algm_d2.checkpoint.released import convert_released
from algm_d2.checkpoint.segmenter import raise_on_mismatch
from algm_d2.config import get_cfg
from algm_d2.engine.optim import build_optimizer
from algm_d2.merge import ALGMConfig, FixedLevel, MergeState, global_merge, local_merge
from algm_d2.modeling import build_model
from algm_d2.modeling.backbone.taps import Tap
from algm_d2.modeling.heads.setr_heads import SETRMLAHead, SETRMLANeck, SETRUpHead

DIM, CLASSES, GRID = 32, 5, (4, 6)
UP = {"naive": ["MODEL.SETR.NUM_CONV", "2", "MODEL.SETR.NUM_UPSAMPLE_LAYER", "1", "MODEL.SETR.AUX_IN_INDEX", "(1, 3)"],
      "pup": ["MODEL.SETR.NUM_CONV", "4", "MODEL.SETR.NUM_UPSAMPLE_LAYER", "4", "MODEL.SETR.AUX_IN_INDEX", "(1, 5)",
              "MODEL.SETR.AUX_NUM_UPSAMPLE_LAYER", "2", "MODEL.SETR.AUX_CONV3X3_CONV1X1", "True"]}


def setr_cfg(head: str, algm: bool = False):
    cfg = get_cfg()
    cfg.merge_from_file("configs/demo/setr_tiny_algm.yaml" if algm else "configs/demo/setr_tiny.yaml")
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = CLASSES
    cfg.MODEL.BACKBONE.EMBED_DIM = DIM
    cfg.MODEL.BACKBONE.NUM_HEADS = 2
    cfg.MODEL.BACKBONE.IMG_SIZE = 64
    if head != "mla":
        cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.NAME", "SETRUpHead", "MODEL.SETR.IN_INDEX", "-1"] + UP[head])
    if algm:
        cfg.MODEL.ALGM.LOCAL_THRESHOLD = "fraction:0.5"
    return cfg


def batch(height: int, width: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8),
             "sem_seg": torch.randint(0, CLASSES, (height, width), generator=g), "height": height, "width": width}
            for _ in range(2)]


@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
@pytest.mark.parametrize("algm", [False, True])
def test_setr_trains_and_predicts_at_a_non_square_size(head, algm):
    torch.manual_seed(0)
    model = build_model(setr_cfg(head, algm))
    losses = model(batch(64, 80))
    assert set(losses) == {"loss_sem_seg", "loss_aux_0", "loss_aux_1"} | ({"loss_aux_2", "loss_aux_3"} if head == "mla"
                                                                           else set())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(batch(64, 80)[:1])[0]["sem_seg"]
    assert out.shape == (CLASSES, 64, 80)
    torch.testing.assert_close(out.sum(0), torch.ones(64, 80))
    kept = model.merge_stats["tokens_per_layer"][-1][0]
    assert (kept < 20) if algm else (kept == 20 + (head != "mla"))


def merged_tap(seed: int = 0, policy: str = "min") -> Tap:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1 + GRID[0] * GRID[1], DIM, generator=g, dtype=torch.float64)
    x[0, 1:13] = x[0, 1:2] + 0.05 * x[0, 1:13]
    state = MergeState.initial(2, GRID, 1, x.device, torch.float64)
    x, state = local_merge(x, state, (2, 2), FixedLevel(fraction=0.5) if policy == "min" else 0.9, policy, 1)
    x, state = global_merge(x, state, FixedLevel(fraction=0.4) if policy == "min" else 0.3, policy, 2)
    return Tap(x, state)


def unmerged(tap: Tap) -> Tap:
    """The same layer with every grid cell its own token (each cell the value of its merged slot)."""
    grid = tap.state.unmerge_patches(tap.patches)
    tokens = torch.cat([tap.tokens[:, :1], grid], dim=1)
    return Tap(tokens, MergeState.initial(grid.shape[0], GRID, 1, grid.device, torch.float64))


@pytest.mark.parametrize("layout", [(2, 1, False), (2, 2, True), (4, 4, True)])
@pytest.mark.parametrize("policy", ["min", "per_image"])
def test_up_head_on_merged_tokens_equals_the_head_on_the_unmerged_grid(layout, policy):
    torch.manual_seed(0)
    head = SETRUpHead(embed_dim=DIM, num_classes=CLASSES, num_conv=layout[0], num_upsample_layer=layout[1],
                      conv3x3_conv1x1=layout[2]).double().eval()
    tap = merged_tap(policy=policy)
    assert tap.state.merged and tap.patches.shape[1] < GRID[0] * GRID[1]
    torch.testing.assert_close(head(tap), head(unmerged(tap)), rtol=1e-12, atol=1e-12)


def test_mla_neck_on_merged_tokens_equals_the_neck_on_the_unmerged_grid():
    torch.manual_seed(0)
    neck = SETRMLANeck(embed_dim=DIM, mla_channels=8).double().eval()
    taps = [merged_tap(seed) for seed in range(4)]
    for a, b in zip(neck(taps), neck([unmerged(t) for t in taps])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
                        sd[prefix + "bias"], False, 0.0, 1e-5)


def _square_up(x, size):  # the release resizes with size=int: square outputs
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _random_bn_statistics(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)


def release_up_head(sd, tokens, num_conv, num_upsample_layer, img_size):
    """fudan-zvg/SETR VisionTransformerUpHead.forward on ``tokens`` [B, 1 + h*w, C] (class token first)."""
    x = tokens[:, 1:] if tokens.shape[1] % 48 != 0 else tokens
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], 1e-6)
    n, hw, c = x.shape
    h = w = int(math.sqrt(hw))
    x = x.transpose(1, 2).reshape(n, c, h, w)

    def conv(x, i):
        weight = sd[f"conv_{i}.weight"]
        return F.conv2d(x, weight, sd[f"conv_{i}.bias"], padding=weight.shape[-1] // 2)

    if num_conv == 2:
        x = F.relu(_bn(conv(x, 0), sd, "syncbn_fc_0."))
        if num_upsample_layer == 2:
            x = _square_up(x, x.shape[-1] * 4)
        return _square_up(conv(x, 1), img_size)
    for i in range(4):
        x = F.relu(_bn(conv(x, i), sd, f"syncbn_fc_{i}."))
        if i < 3:
            x = _square_up(x, x.shape[-1] * 2)
    return _square_up(conv(x, 4), x.shape[-1] * 2)


@pytest.mark.parametrize("layout", [(2, 1, False), (2, 2, True), (4, 4, True)])
def test_up_head_computes_what_the_release_computes(layout):
    torch.manual_seed(0)
    head = SETRUpHead(embed_dim=DIM, num_classes=CLASSES, num_conv=layout[0], num_upsample_layer=layout[1],
                      conv3x3_conv1x1=layout[2]).double().eval()
    _random_bn_statistics(head)
    tokens = torch.randn(2, 1 + 16, DIM, dtype=torch.float64)
    state = MergeState.initial(2, (4, 4), 1, tokens.device, torch.float64)
    ours = F.interpolate(head(Tap(tokens, state)), size=(64, 64), mode="bilinear", align_corners=False)
    expected = release_up_head(head.state_dict(), tokens, layout[0], layout[1], 64)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_mla_neck_and_head_compute_what_the_release_computes():
    torch.manual_seed(0)
    neck = SETRMLANeck(embed_dim=DIM, mla_channels=8).double().eval()
    head = SETRMLAHead(num_classes=CLASSES, mla_channels=8, mlahead_channels=4).double().eval()
    _random_bn_statistics(neck)
    _random_bn_statistics(head)
    outs = [torch.randn(2, 16, DIM, dtype=torch.float64) for _ in range(4)]  # MLA's ViT has no class token
    state = MergeState.initial(2, (4, 4), 0, outs[0].device, torch.float64)
    ours = head(neck([Tap(o, state) for o in outs]))
    sd = {**{f"backbone.{k}": v for k, v in neck.state_dict().items()},
          **{f"decode_head.{k}": v for k, v in head.state_dict().items()}}

    def cbr(x, prefix):  # Sequential(conv, BN, ReLU) at indices (0, 1) — and (3, 4) for the head's second pair
        return F.relu(_bn(F.conv2d(x, sd[prefix + "0.weight"], padding=sd[prefix + "0.weight"].shape[-1] // 2), sd,
                          prefix + "1."))

    # VIT_MLA.forward: norm_i on the taps, to 2-D, Conv_MLA with its top-down sums
    c = [F.layer_norm(o, (DIM,), sd[f"backbone.norm_{i}.weight"], sd[f"backbone.norm_{i}.bias"], 1e-6)
         .transpose(1, 2).reshape(2, DIM, 4, 4) for i, o in enumerate(outs)]
    p5_1 = cbr(c[3], "backbone.mla.mla_p5_1x1.")
    p4_plus = p5_1 + cbr(c[2], "backbone.mla.mla_p4_1x1.")
    p3_plus = p4_plus + cbr(c[1], "backbone.mla.mla_p3_1x1.")
    p2_plus = p3_plus + cbr(c[0], "backbone.mla.mla_p2_1x1.")
    levels = [cbr(p2_plus, "backbone.mla.mla_p2."), cbr(p3_plus, "backbone.mla.mla_p3."),
              cbr(p4_plus, "backbone.mla.mla_p4."), cbr(p5_1, "backbone.mla.mla_p5.")]
    heads = []
    for level, x in zip((2, 3, 4, 5), levels):
        prefix = f"decode_head.mlahead.head{level}."
        x = cbr(x, prefix)
        x = F.relu(_bn(F.conv2d(x, sd[prefix + "3.weight"], padding=1), sd, prefix + "4."))
        heads.append(F.interpolate(x, 4 * x.shape[-1], mode="bilinear", align_corners=True))
    expected = F.conv2d(torch.cat(heads, 1), sd["decode_head.cls.weight"], sd["decode_head.cls.bias"], padding=1)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def release_shapes(head: str, *, dim: int = DIM, depth: int = 6, grid: int = 4, classes: int = CLASSES,
                   aux: int = 2, mla: tuple = (32, 16), channels: int = 512) -> dict:
    """Key → shape of a fudan-zvg/SETR EncoderDecoder checkpoint, written from the release's module names
    (``VisionTransformer``/``VIT_MLA`` + ``Conv_MLA``, ``VisionTransformerUpHead``, ``VIT_MLAHead``,
    ``VIT_MLA_AUXIHead``; mmseg's ``BaseDecodeHead`` adds an unused ``conv_seg``)."""
    shapes = {"backbone.cls_token": (1, 1, dim), "backbone.pos_embed": (1, 1 + grid * grid, dim),
              "backbone.patch_embed.proj.weight": (dim, 3, 16, 16), "backbone.patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        p = f"backbone.blocks.{i}."
        shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "attn.qkv.weight": (3 * dim, dim),
                       p + "attn.qkv.bias": (3 * dim,), p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                       p + "norm2.weight": (dim,), p + "norm2.bias": (dim,), p + "mlp.fc1.weight": (4 * dim, dim),
                       p + "mlp.fc1.bias": (4 * dim,), p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)})

    def bn(prefix, n):
        shapes.update({prefix + "weight": (n,), prefix + "bias": (n,), prefix + "running_mean": (n,),
                       prefix + "running_var": (n,), prefix + "num_batches_tracked": ()})

    def conv_seg(prefix):
        shapes.update({prefix + "conv_seg.weight": (classes, channels, 1, 1), prefix + "conv_seg.bias": (classes,)})

    def up_head(prefix, kernels):  # kernels of conv_0 .. conv_{n-1}; then the 1x1 classifier conv_n
        shapes.update({prefix + "norm.weight": (dim,), prefix + "norm.bias": (dim,)})
        for i, k in enumerate(kernels):
            shapes.update({prefix + f"conv_{i}.weight": (256, dim if i == 0 else 256, k, k),
                           prefix + f"conv_{i}.bias": (256,)})
            bn(prefix + f"syncbn_fc_{i}.", 256)
        n = len(kernels)
        shapes.update({prefix + f"conv_{n}.weight": (classes, 256, 1, 1), prefix + f"conv_{n}.bias": (classes,)})
        conv_seg(prefix)

    if head == "naive":
        up_head("decode_head.", [1])
        for i in range(aux):
            up_head(f"auxiliary_head.{i}.", [1])
    elif head == "pup":
        up_head("decode_head.", [3, 3, 3, 3])
        for i in range(aux):
            up_head(f"auxiliary_head.{i}.", [3])
    else:
        c, h = mla
        shapes.update({f"backbone.norm_{i}.{k}": (dim,) for i in range(4) for k in ("weight", "bias")})
        for level in (2, 3, 4, 5):
            shapes[f"backbone.mla.mla_p{level}_1x1.0.weight"] = (c, dim, 1, 1)
            bn(f"backbone.mla.mla_p{level}_1x1.1.", c)
            shapes[f"backbone.mla.mla_p{level}.0.weight"] = (c, c, 3, 3)
            bn(f"backbone.mla.mla_p{level}.1.", c)
            shapes[f"decode_head.mlahead.head{level}.0.weight"] = (h, c, 3, 3)
            bn(f"decode_head.mlahead.head{level}.1.", h)
            shapes[f"decode_head.mlahead.head{level}.3.weight"] = (h, h, 3, 3)
            bn(f"decode_head.mlahead.head{level}.4.", h)
        shapes.update({"decode_head.cls.weight": (classes, 4 * h, 3, 3), "decode_head.cls.bias": (classes,)})
        conv_seg("decode_head.")
        for i in range(aux):
            shapes[f"auxiliary_head.{i}.aux.weight"] = (classes, c, 1, 1)
            conv_seg(f"auxiliary_head.{i}.")
    return shapes


def random_tensors(shapes: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 9, s, generator=g) if k.endswith("num_batches_tracked") else
                torch.rand(s, generator=g) + 0.5 if k.endswith("running_var") else torch.randn(s, generator=g))
            for k, s in shapes.items()}


def release_layout(head: str) -> dict:
    """A tiny checkpoint in the release's layout for the tiny configs (MLA: 4 auxiliary heads)."""
    return random_tensors(release_shapes(head, aux=4 if head == "mla" else 2))


def assert_full_size_layout(config: str, release: dict) -> None:
    """The network ``config`` builds (on the meta device) takes exactly the release's keys and shapes."""
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        net = build_model(cfg).net
    meta = {k: torch.empty(s, device="meta") for k, s in release.items()}
    raise_on_mismatch(net.state_dict(), convert_released(net, meta, config), f"{config} vs the release")


@pytest.mark.parametrize("head, aux", [("naive", 3), ("pup", 4), ("mla", 4)])
def test_full_size_configs_take_the_releases_keys_and_shapes(head, aux):
    release = release_shapes(head, dim=1024, depth=24, grid=32, classes=150, aux=aux, mla=(256, 128))
    assert_full_size_layout(f"configs/ade20k/setr/setr_{head}_vit_large_512x512_160k_algm.yaml", release)


@pytest.mark.parametrize("head", ["naive", "mla"])
def test_checkpoint_in_the_release_layout_loads_strictly(tmp_path, head, caplog):
    cfg = setr_cfg(head)
    if head == "naive":
        cfg.merge_from_list(["MODEL.SETR.CONV3X3_CONV1X1", "False"])
    torch.manual_seed(0)
    model = build_model(cfg)
    release = release_layout(head)
    torch.save({"meta": {"CLASSES": ("a", "b")}, "state_dict": release}, tmp_path / "setr.pth")
    with caplog.at_level("INFO"):
        load_model_weights(model, tmp_path / "setr.pth")
    assert "decode_head.conv_seg.weight" in caplog.text
    state = model.net.state_dict()
    if head == "mla":
        assert "backbone.cls_token" in caplog.text
        torch.testing.assert_close(state["backbone.pos_embed"], release["backbone.pos_embed"][:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(state["neck.mla.mla_p3.0.weight"], release["backbone.mla.mla_p3.0.weight"])
        torch.testing.assert_close(state["neck.norm_2.bias"], release["backbone.norm_2.bias"])
    else:
        torch.testing.assert_close(state["backbone.pos_embed"], release["backbone.pos_embed"])
        torch.testing.assert_close(state["auxiliary_head.1.syncbn_fc_0.running_var"],
                                   release["auxiliary_head.1.syncbn_fc_0.running_var"])
    torch.testing.assert_close(state["backbone.blocks.3.attn.qkv.weight"], release["backbone.blocks.3.attn.qkv.weight"])

    release.pop("backbone.blocks.5.mlp.fc2.bias")
    release["decode_head.extra.weight"] = torch.zeros(1)
    release["backbone.blocks.0.norm1.weight"] = torch.zeros(DIM + 1)
    torch.save({"state_dict": release}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_weights(model, tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing (1): backbone.blocks.5.mlp.fc2.bias" in message
    assert "unexpected (1): decode_head.extra.weight" in message
    assert f"backbone.blocks.0.norm1.weight: checkpoint ({DIM + 1},) vs model ({DIM},)" in message


def test_heads_train_at_ten_times_the_lr():
    cfg = setr_cfg("naive")
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 10.0
    cfg.SOLVER.BASE_LR = 0.01
    optimizer = build_optimizer(cfg, build_model(cfg))
    lrs = {name: group["lr"] for group in optimizer.param_groups for name in group["names"]}
    assert lrs["net.decode_head.conv_0.weight"] == pytest.approx(0.1)
    assert lrs["net.auxiliary_head.1.norm.bias"] == pytest.approx(0.1)
    assert lrs["net.backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.01)


def test_bad_setr_settings_name_the_key():
    cfg = setr_cfg("naive")
    cfg.MODEL.SETR.NUM_UPSAMPLE_LAYER = 3
    with pytest.raises(ValueError, match="NUM_UPSAMPLE_LAYER"):
        build_model(cfg)
    cfg = setr_cfg("mla")
    cfg.MODEL.SETR.MLA_INDEX = (0, 1, 2, 9)
    with pytest.raises(ValueError, match="MODEL.SETR.MLA_INDEX: block index 9"):
        build_model(cfg)


@pytest.mark.parametrize("network", ["naive", "mla", "segvit"])
def test_algm_that_merges_nothing_gives_the_plain_outputs(network):
    """SETR's heads and SegViT's ATM decoder on the tapped layers: both stages on, nothing merged = plain."""
    from .test_segvit import segvit_cfg

    torch.manual_seed(0)
    net = build_model(segvit_cfg() if network == "segvit" else setr_cfg(network)).net.eval()
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        plain = net(images)
        net.set_algm(ALGMConfig(local_layer=1, global_layer=3, local_threshold=FixedLevel(count=0),
                                global_threshold=FixedLevel(count=0)))
        nothing = net(images)
        labels = net.predict_labels(images)
    torch.testing.assert_close(nothing, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, nothing.argmax(1))
