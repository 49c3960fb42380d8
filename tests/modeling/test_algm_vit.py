"""The backbone wrapper over timm ViT / DeiT / EVA-01 / EVA-02: parity with timm, merging, RoPE, checkpointing."""
from __future__ import annotations


import pytest
import timm
import torch

from algm_d2 import ALGMConfig, apply_algm
from algm_d2.merge import OFF
from algm_d2.modeling.backbone.rope import RotaryPhases

TINY = dict(pretrained=False, num_classes=0, img_size=64, embed_dim=48, depth=4, num_heads=3)
NOTHING = ALGMConfig(local_layer=1, global_layer=3, local_threshold=1.5, global_threshold=1.5)


def timm_models():
    torch.manual_seed(0)
    return {
        "vit": timm.create_model("vit_tiny_patch16_224", patch_size=16, **TINY),
        "deit_distilled": timm.create_model("deit_tiny_distilled_patch16_224", **TINY),
        "vit_reg": timm.create_model("vit_tiny_patch16_224", reg_tokens=2, **TINY),
        "eva01": timm.create_model("eva_giant_patch14_224", patch_size=16, mlp_ratio=6144 / 1408, **TINY),
        "eva02": timm.create_model("eva02_tiny_patch14_224", patch_size=16, **TINY),
    }


@pytest.fixture(scope="module")
def models():
    return {name: model.eval() for name, model in timm_models().items()}


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "vit_reg", "eva01", "eva02"])
def test_stages_off_equal_timm_forward_and_keys(models, name):
    model = models[name]
    wrapper = apply_algm(model, OFF)
    assert list(wrapper.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, state = wrapper(x)
        assert torch.equal(tokens, model.forward_features(x))
    assert state.tokens_per_layer() == [[tokens.shape[1]] * 2] * 4


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "eva01", "eva02"])
def test_thresholds_that_merge_nothing_match_within_tolerance(models, name):
    model = models[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_features(x)
        tokens, state = apply_algm(model, NOTHING)(x)
    p = state.num_prefix
    torch.testing.assert_close(tokens[:, :p], expected[:, :p], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.unmerge(tokens), expected[:, p:], rtol=1e-5, atol=1e-5)


def test_merging_shrinks_tokens_and_unmerges_to_a_grid(models):
    """Non-square input (pos embed resized), RoPE model built for dynamic sizes, per-image policy, prop. attention."""
    torch.manual_seed(0)
    eva02 = timm.create_model("eva02_tiny_patch14_224", patch_size=16, dynamic_img_size=True, **TINY).eval()
    config = ALGMConfig(local_layer=1, global_layer=2, local_threshold=-1.0, global_threshold="batch_stats",
                        batch_policy="per_image", prop_attn=True)
    x = torch.randn(3, 3, 64, 80)
    for model in (models["vit"], eva02):
        with torch.no_grad():
            tokens, state = apply_algm(model, config)(x)
        counts = state.tokens_per_layer()
        # The 4x5 grid has four full 2x2 windows (16 cells -> 4 tokens); the last column stays unmerged.
        assert counts[0] == [state.num_prefix + 20 - 16 + 4] * 3
        assert all(c2 <= c1 for c1, c2 in zip(counts[0], counts[1]))
        assert state.unmerge_to_grid(tokens).shape == (3, tokens.shape[-1], 4, 5)


def test_eva02_rope_at_mean_positions():
    """Phases read off timm's grid embedding reproduce it; a merged 2x2 window gets the phase of its centre."""
    rope = timm.create_model("eva02_tiny_patch14_224", patch_size=16, dynamic_img_size=True, **TINY).rope
    grid = rope.get_embed(shape=[4, 4])
    phases = RotaryPhases(grid, (4, 4))
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    positions = torch.stack([rows, cols], -1).reshape(-1, 2)
    torch.testing.assert_close(phases.embed(positions), grid.float(), rtol=0, atol=1e-4)
    # Phases are affine: the centre of the first 2x2 window lies halfway between the phases of cells (0,0), (1,1).
    theta = torch.atan2(*grid.float().chunk(2, -1))
    centre = phases.embed(torch.tensor([[0.5, 0.5]]))[0]
    mid = theta[0] + 0.5 * (phases.row_step + phases.col_step)
    torch.testing.assert_close(centre, torch.cat([mid.sin(), mid.cos()]), rtol=0, atol=1e-5)
    bent = grid.clone()
    bent[5] = bent[0]
    with pytest.raises(NotImplementedError, match="not affine"):
        RotaryPhases(bent, (4, 4))


def test_activation_checkpointing_gives_the_same_gradients(models):
    model = models["vit"]
    config = ALGMConfig(local_layer=1, global_layer=2, local_threshold=0.0)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        wrapper = apply_algm(model, config, activation_checkpointing=checkpointing).train()
        model.zero_grad()
        tokens, state = wrapper(x)
        state.unmerge(tokens).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    model.eval()
    torch.testing.assert_close(grads[0], grads[1])


def test_wrapper_rejects_bad_inputs(models):
    with pytest.raises(ValueError, match="global_layer=9"):
        apply_algm(models["vit"], ALGMConfig(global_layer=9))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        apply_algm(models["vit"], OFF)(torch.randn(1, 3, 60, 64))
    with pytest.raises(TypeError, match="timm"):
        apply_algm(torch.nn.Linear(2, 2), OFF)


def test_patch_embedding_as_one_gemm_equals_the_convolution():
    """The CUDA path of ``patchify`` (forced here on CPU tensors) against the conv, float64."""
    from algm_d2.modeling.backbone import algm_vit

    torch.manual_seed(0)
    proj = torch.nn.Conv2d(3, 8, 16, 16).double()
    images = torch.randn(2, 3, 48, 80, dtype=torch.float64)

    class CudaLike(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    as_gemm = algm_vit.patchify(proj, images.as_subclass(CudaLike))
    torch.testing.assert_close(torch.Tensor(as_gemm), proj(images), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(2, 4000), (16, 2048), (8, 8), (4000, 2)])
def test_images_thinner_than_the_window_run_and_match_the_plain_model(size):
    """Grids of 1 row or column (or 1x1) hold no full CLAP window: the stage is skipped, and with GBM also merging
    nothing the result is the plain model's; with GBM's batch statistics the model still runs."""
    from algm_d2.checkpoint import build_from_variant

    from .test_segmenter import variant

    image = torch.randn(1, 3, *size)
    outputs = []
    for config in (OFF, ALGMConfig(local_layer=1, global_layer=3, local_threshold=-1.0, global_threshold=1.5),
                   ALGMConfig(local_layer=1, global_layer=3, local_threshold=-1.0)):
        torch.manual_seed(0)
        model = build_from_variant(variant(), algm=config).eval()
        with torch.no_grad():
            outputs.append(model(image))
    assert all(out.shape == (1, 5, *size) and torch.isfinite(out).all() for out in outputs)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
