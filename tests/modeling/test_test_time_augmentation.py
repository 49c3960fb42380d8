"""Test-time augmentation rules: Segmenter's (softmax of logits per view, small images upsampled to the crop) and
EVA's (``encoder_decoder_mask2former_aug.py``: softmax over classes of every view's scores, Mask2Former's
probability-like ones included, before flips and scales are averaged; ``PadShortSide``: a short side below the crop
is padded with black pixels and the padding dropped after sliding), compared with references computed by hand."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algm_d2.config import get_cfg
from algm_d2.modeling import SegmentationModel

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


class PixelScores(nn.Module):
    """Per-pixel scores from a fixed 1x1 convolution (any crop gives each pixel the same scores); records inputs.
    ``output_kind`` "probabilities" stands for Mask2Former's softmax(class) x sigmoid(mask) scores."""

    def __init__(self, output_kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.output_kind = output_kind
        self.inputs = []

    def forward(self, images):
        self.inputs.append(images.clone())
        scores = self.conv(images)
        return scores.sigmoid() / 4 if self.output_kind == "probabilities" else scores


def segmentor(net, **kwargs):
    return SegmentationModel(net=net, pixel_mean=MEAN, pixel_std=STD, **kwargs).eval()


def normalized(image):
    return (image.float() - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture
def image():
    torch.manual_seed(1)
    return torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8)


def test_eva_softmaxes_every_view_before_averaging(image):
    net = PixelScores("probabilities")
    scores = net.conv(normalized(image)[None])[0].sigmoid().detach() / 4
    flipped = net.conv(normalized(image).flip(-1)[None])[0].sigmoid().detach().flip(-1) / 4
    eva = segmentor(net, test_flip=True, softmax_views=True)([{"image": image}])[0]["sem_seg"]
    torch.testing.assert_close(eva, (scores.softmax(0) + flipped.softmax(0)) / 2, rtol=1e-6, atol=1e-7)
    averaged = segmentor(net, test_flip=True)([{"image": image}])[0]["sem_seg"]
    torch.testing.assert_close(averaged, (scores + flipped) / 2, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(eva, averaged)


def test_logits_are_softmaxed_per_view_under_both_rules(image):
    net = PixelScores("logits")
    logits = net.conv(normalized(image)[None])[0].detach()
    for softmax_views in (False, True):
        out = segmentor(net, softmax_views=softmax_views)([{"image": image}])[0]["sem_seg"]
        torch.testing.assert_close(out, logits.softmax(0), rtol=1e-6, atol=1e-7)


def test_eva_pads_a_short_side_below_the_crop_with_black_and_drops_the_padding(image):
    """A 12x20 image, crop 16, stride 8: padded to 16x20 with pixel value 0; per-pixel scores then equal the
    unpadded image's exactly, where upsampling to the crop changes them."""
    net = PixelScores("logits")
    expected = net.conv(normalized(image)[None])[0].detach().softmax(0)
    padded = segmentor(net, test_mode="slide", crop_size=16, stride=8, small_image="pad")([{"image": image}])
    torch.testing.assert_close(padded[0]["sem_seg"], expected, rtol=1e-6, atol=1e-6)
    crops = torch.cat(net.inputs)
    assert crops.shape[-2:] == (16, 16)
    black = normalized(torch.zeros(3, 1, 1, dtype=torch.uint8))
    first = net.inputs[0][0]  # the crop at (0, 0): rows 12..15 are padding
    torch.testing.assert_close(first[:, 12:], black.expand(3, 4, 16), rtol=0, atol=1e-6)
    torch.testing.assert_close(first[:, :12], normalized(image)[:, :, :16], rtol=0, atol=1e-6)
    upsampled = segmentor(net, test_mode="slide", crop_size=16, stride=8)([{"image": image}])
    assert not torch.allclose(upsampled[0]["sem_seg"], expected, atol=1e-3)


def test_eva_configs_follow_eva_and_segmenter_configs_keep_the_release_rules():
    for name in ("configs/ade20k/eva.yaml", "configs/ade20k/eva_algm.yaml", "configs/demo/eva_tiny.yaml"):
        cfg = get_cfg()
        cfg.merge_from_file(str(ROOT / name))
        assert cfg.TEST.SOFTMAX_VIEWS and cfg.TEST.SLIDE_SMALL_IMAGE == "pad", name
    for path in sorted((ROOT / "configs/ade20k/segmenter").glob("*.yaml"))[:2]:
        cfg = get_cfg()
        cfg.merge_from_file(str(path))
        assert not cfg.TEST.SOFTMAX_VIEWS and cfg.TEST.SLIDE_SMALL_IMAGE == "upsample", path


def test_an_unknown_small_image_rule_is_named():
    with pytest.raises(ValueError, match="TEST.SLIDE_SMALL_IMAGE must be one of"):
        segmentor(PixelScores("logits"), small_image="crop")
