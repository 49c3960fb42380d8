"""MODEL.ALGM.PROP_ATTN reaches the Segmenter's decoder through the network's ALGMConfig (set_algm included); the
decoders built for merged tokens (Mask2Former's, SegViT's ATM) weigh a merged token by its size whatever it says."""
from __future__ import annotations

import dataclasses

import torch

from algm_d2.config import get_cfg
from algm_d2.modeling import build_model
from algm_d2.modeling.mask2former import MergedTokenMaskedTransformerDecoder

from .test_eva_mask2former import merged_state


def segmenter_cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_file("configs/demo/segmenter_tiny_algm.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def test_the_segmenter_hands_its_prop_attn_to_its_decoder():
    torch.manual_seed(0)
    net = build_model(segmenter_cfg("MODEL.ALGM.PROP_ATTN", "True")).eval().net
    seen = []
    net.decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("prop_attn")),
                                          with_kwargs=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        net(images)
        net.set_algm(dataclasses.replace(net.algm, prop_attn=False))
        net(images)
    assert seen == [True, False]


def test_the_merged_token_decoder_weighs_merged_tokens_by_size():
    torch.manual_seed(0)
    decoder = MergedTokenMaskedTransformerDecoder(in_channels=8, num_classes=3, hidden_dim=16, num_queries=4,
                                                  num_heads=2, ffn_dim=32, num_layers=1, mask_dim=16).double()
    x, state = merged_state(0, "min")
    assert state.merged and not state.padded and (state.sizes > 1).any()
    unit = dataclasses.replace(state, sizes=torch.ones_like(state.sizes))  # each merged token as one key
    assert not torch.allclose(decoder(x[:, 1:], state)["pred_masks"], decoder(x[:, 1:], unit)["pred_masks"])
