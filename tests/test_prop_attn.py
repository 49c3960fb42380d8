"""MODEL.ALGM.PROP_ATTN reaches every decoder on merged tokens through the network's ALGMConfig (set_algm included),
and the decoders' log(size) key bias follows it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from algm_d2.config import get_cfg
from algm_d2.modeling import build_model
from algm_d2.modeling.mask2former import MergedTokenMaskedTransformerDecoder

from .test_eva_mask2former import eva_cfg, merged_state
from .test_segvit import segvit_cfg

MERGED_MASK2FORMER = ("MODEL.META_ARCHITECTURE", "MergedTokenMask2Former",
                      "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "MergedTokenMaskedTransformerDecoder",
                      "MODEL.MASK_FORMER.HIDDEN_DIM", "64", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
                      "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
                      "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.SEM_SEG_HEAD.MASK_DIM", "64")


def segmenter_cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_file("configs/demo/segmenter_tiny_algm.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.mark.parametrize("make_cfg, decoder_name", [
    (segmenter_cfg, "decoder"),
    (lambda *opts: eva_cfg("configs/demo/segmenter_tiny_algm.yaml", *MERGED_MASK2FORMER, *opts), "decoder"),
    (lambda *opts: _with(segvit_cfg(True), opts), "decode_head"),
])
def test_the_network_hands_its_prop_attn_to_its_decoder(make_cfg, decoder_name):
    torch.manual_seed(0)
    model = build_model(make_cfg("MODEL.ALGM.PROP_ATTN", "True")).eval()
    net = model.net
    seen = []
    getattr(net, decoder_name).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("prop_attn")), with_kwargs=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        net(images)
        net.set_algm(dataclasses.replace(net.algm, prop_attn=False))
        net(images)
    assert seen == [True, False]


def _with(cfg, opts):
    cfg.merge_from_list(list(opts))
    return cfg


def test_the_merged_token_decoder_adds_log_size_only_with_prop_attn():
    torch.manual_seed(0)
    decoder = MergedTokenMaskedTransformerDecoder(in_channels=8, num_classes=3, hidden_dim=16, num_queries=4,
                                                  num_heads=2, ffn_dim=32, num_layers=1, mask_dim=16).double()
    x, state = merged_state(0, "min")
    assert state.merged and not state.padded and (state.sizes > 1).any()
    with_sizes = decoder(x[:, 1:], state, prop_attn=True)
    without = decoder(x[:, 1:], state, prop_attn=False)
    assert not torch.allclose(with_sizes["pred_masks"], without["pred_masks"])
    # without proportional attention a merged token is one key: the decoder on an unmerged copy of each token
    # once equals it (the same tokens, sizes 1)
    unit = dataclasses.replace(state, sizes=torch.ones_like(state.sizes))
    torch.testing.assert_close(without["pred_logits"], decoder(x[:, 1:], unit, prop_attn=True)["pred_logits"])
