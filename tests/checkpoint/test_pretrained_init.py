"""timm / EVA weight files initialise the backbone's ViT (layout conversion, resizing, key checks)."""
from __future__ import annotations

import pytest
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from algm_d2.checkpoint import CheckpointMismatchError, load_pretrained_vit
from algm_d2.modeling import ALGMViT, ViTAdapter, build_eva, build_segmenter_vit


def tiny_adapter() -> ViTAdapter:
    vit = build_eva(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)
    return ViTAdapter(vit=vit, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], conv_inplane=8,
                      deform_num_heads=4)


def test_eva01_file_with_patch_14_and_a_classifier_initialises_the_adapters_vit(tmp_path):
    torch.manual_seed(0)
    source = Eva(img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)
    torch.save({"model": source.state_dict()}, tmp_path / "eva.pth")
    model = tiny_adapter()
    spm_before = model.spm.fc1.weight.clone()
    load_pretrained_vit(model, tmp_path / "eva.pth")
    assert torch.equal(model.blocks[2].mlp.fc1.weight, source.blocks[2].mlp.fc1.weight)
    assert torch.equal(model.blocks[0].attn.q_bias, source.blocks[0].attn.q_bias)
    assert model.patch_embed.proj.weight.shape == (32, 3, 16, 16)  # resampled from 14×14
    assert model.pos_embed.shape == (1, 1 + 16, 32)  # resampled from 4×4 to 4×4 + class token kept
    assert torch.equal(model.spm.fc1.weight, spm_before)  # the adapter is not touched


def test_eva02_file_loads_with_rope_and_swiglu(tmp_path):
    torch.manual_seed(0)
    source = Eva(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                 scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=5, use_fc_norm=False)
    torch.save(source.state_dict(), tmp_path / "eva02.pth")
    model = ALGMViT(vit=build_eva(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                                  mlp_ratio=4 * 2 / 3, eva02=True, rope_pretrain_grid=4))
    load_pretrained_vit(model, tmp_path / "eva02.pth")
    assert torch.equal(model.blocks[1].mlp.fc1_g.weight, source.blocks[1].mlp.fc1_g.weight)
    assert torch.equal(model.norm.weight, source.norm.weight)


def test_timm_vit_file_initialises_segmenters_encoder(tmp_path):
    source = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = ALGMViT(vit=build_segmenter_vit(img_size=64, embed_dim=32, depth=2, num_heads=2))
    load_pretrained_vit(model, tmp_path / "vit.pth")
    assert torch.equal(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert torch.equal(model.norm.weight, source.norm.weight)
    assert model.pos_embed.shape == (1, 1 + 16, 32)


def test_a_file_of_another_architecture_is_refused_with_the_keys_named(tmp_path):
    source = Eva(img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "eva3.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\): blocks\.3\."):
        load_pretrained_vit(tiny_adapter(), tmp_path / "eva3.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        load_pretrained_vit(tiny_adapter(), tmp_path / "broken.pth")
