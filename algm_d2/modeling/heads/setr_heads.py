"""SETR's decoders (Zheng et al., CVPR 2021): CNN heads on the patch grid of intermediate ViT layers.

With ALGM, each head unmerges the tokens of the layer it reads with one gather (:meth:`Tap.grid`) after the
per-token LayerNorm; the convolutions run on the full grid. Module names are the release's (fudan-zvg/SETR, mmseg
0.x): ``VisionTransformerUpHead`` → :class:`SETRUpHead` (naive and PUP), ``VIT_MLA``'s ``mla`` + ``norm_i`` →
:class:`SETRMLANeck`, ``VIT_MLAHead`` → :class:`SETRMLAHead`, ``VIT_MLA_AUXIHead`` → :class:`SETRMLAAuxHead`.
Every head returns class logits one bilinear resize short of the input size: the network does that last resize.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone.taps import Tap
from ..backbone.vit_adapter import BatchNorm2d
from ..registry import SEM_SEG_HEAD_REGISTRY

# (NUM_CONV, NUM_UPSAMPLE_LAYER) pairs the release's VisionTransformerUpHead implements.
UP_HEAD_LAYOUTS = ((2, 1), (2, 2), (4, 4))


def _upsample(x: Tensor, factor: int, align_corners: bool = False) -> Tensor:
    return F.interpolate(x, size=(x.shape[-2] * factor, x.shape[-1] * factor), mode="bilinear",
                         align_corners=align_corners)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), BatchNorm2d(cout), nn.ReLU())


@SEM_SEG_HEAD_REGISTRY.register()
class SETRUpHead(nn.Module):
    """SETR-Naive and SETR-PUP: LayerNorm per token → unmerge → convs with BN/ReLU and bilinear ×2/×4 upsampling.

    Layouts (``num_conv``, ``num_upsample_layer``): (2, 1) naive (``conv3x3_conv1x1=False``: two 1×1 convs);
    (2, 2) the auxiliary heads of PUP (3×3 conv, ×4, 1×1 conv); (4, 4) PUP (four 3×3 conv + ×2 stages, 1×1 conv;
    the last ×2 is the network's final resize).
    """

    def __init__(self, *, embed_dim: int, num_classes: int, num_conv: int = 2, num_upsample_layer: int = 1,
                 conv3x3_conv1x1: bool = True, channels: int = 256, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if (num_conv, num_upsample_layer) not in UP_HEAD_LAYOUTS:
            raise ValueError(f"MODEL.SETR: (NUM_CONV, NUM_UPSAMPLE_LAYER) must be one of {UP_HEAD_LAYOUTS}, got "
                             f"{(num_conv, num_upsample_layer)}")
        # conv/BN/ReLU stages before the 1×1 classifier conv: 1 for NUM_CONV 2, 4 for NUM_CONV 4 (conv_0..3 + conv_4)
        self.num_stages = 1 if num_conv == 2 else 4
        self.num_upsample_layer = num_upsample_layer
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        first_kernel = 3 if conv3x3_conv1x1 or num_conv == 4 else 1
        self.conv_0 = nn.Conv2d(embed_dim, channels, first_kernel, padding=first_kernel // 2)
        for i in range(1, self.num_stages):
            self.add_module(f"conv_{i}", nn.Conv2d(channels, channels, 3, padding=1))
        self.add_module(f"conv_{self.num_stages}", nn.Conv2d(channels, num_classes, 1))
        for i in range(self.num_stages):
            self.add_module(f"syncbn_fc_{i}", BatchNorm2d(channels))

    @classmethod
    def from_config(cls, cfg, embed_dim: int, auxiliary: bool = False) -> "SETRUpHead":  # noqa: ANN001
        node = cfg.MODEL.SETR
        if auxiliary:
            return cls(embed_dim=embed_dim, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, num_conv=2,
                       num_upsample_layer=node.AUX_NUM_UPSAMPLE_LAYER, conv3x3_conv1x1=node.AUX_CONV3X3_CONV1X1)
        return cls(embed_dim=embed_dim, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, num_conv=node.NUM_CONV,
                   num_upsample_layer=node.NUM_UPSAMPLE_LAYER, conv3x3_conv1x1=node.CONV3X3_CONV1X1)

    def forward(self, tap: Tap) -> Tensor:
        """The tokens of one layer → logits ``[B, K, h', w']`` (h' = h, or 4h for (2, 2), 8h for (4, 4))."""
        x = tap.grid(self.norm(tap.patches))  # LayerNorm is per token: on the merged tokens, then one gather
        for i in range(self.num_stages):
            x = F.relu(getattr(self, f"syncbn_fc_{i}")(getattr(self, f"conv_{i}")(x)))
            if self.num_upsample_layer == 2:
                x = _upsample(x, 4)
            elif self.num_upsample_layer == 4 and i < self.num_stages - 1:
                x = _upsample(x, 2)
        return getattr(self, f"conv_{self.num_stages}")(x)


class ConvMLA(nn.Module):
    """SETR's multi-level aggregation (``Conv_MLA``): 1×1 conv per level, top-down sums, 3×3 conv per level."""

    def __init__(self, embed_dim: int, mla_channels: int) -> None:
        super().__init__()
        for level in (2, 3, 4, 5):
            self.add_module(f"mla_p{level}_1x1", _conv_bn_relu(embed_dim, mla_channels, 1))
            self.add_module(f"mla_p{level}", _conv_bn_relu(mla_channels, mla_channels, 3))

    def forward(self, maps: Sequence[Tensor]) -> List[Tensor]:
        """Four maps, shallowest first → (p2, p3, p4, p5)."""
        lateral = [getattr(self, f"mla_p{level}_1x1")(m) for level, m in zip((2, 3, 4, 5), maps)]
        summed = [lateral[3]]
        for i in (2, 1, 0):
            summed.insert(0, summed[0] + lateral[i])
        return [getattr(self, f"mla_p{level}")(m) for level, m in zip((2, 3, 4, 5), summed)]


class SETRMLANeck(nn.Module):
    """LayerNorm per token of each of the four tapped layers (``norm_0..3``) → unmerge each → :class:`ConvMLA`.

    In the release this sits in the backbone (``backbone.norm_i``, ``backbone.mla``); here it is ``neck``.
    """

    def __init__(self, *, embed_dim: int, mla_channels: int = 256, norm_eps: float = 1e-6) -> None:
        super().__init__()
        for i in range(4):
            self.add_module(f"norm_{i}", nn.LayerNorm(embed_dim, eps=norm_eps))
        self.mla = ConvMLA(embed_dim, mla_channels)

    def forward(self, taps: Sequence[Tap]) -> List[Tensor]:
        if len(taps) != 4:
            raise ValueError(f"SETRMLANeck reads 4 layers, got {len(taps)}")
        return self.mla([tap.grid(getattr(self, f"norm_{i}")(tap.patches)) for i, tap in enumerate(taps)])


@SEM_SEG_HEAD_REGISTRY.register()
class SETRMLAHead(nn.Module):
    """SETR-MLA's head: two 3×3 conv/BN/ReLU per level, ×4 (align_corners=True, as the release), concat, 3×3 conv."""

    def __init__(self, *, num_classes: int, mla_channels: int = 256, mlahead_channels: int = 128) -> None:
        super().__init__()
        self.mlahead = nn.Module()
        for level in (2, 3, 4, 5):
            layers = [*_conv_bn_relu(mla_channels, mlahead_channels, 3), *_conv_bn_relu(mlahead_channels,
                                                                                        mlahead_channels, 3)]
            self.mlahead.add_module(f"head{level}", nn.Sequential(*layers))
        self.cls = nn.Conv2d(4 * mlahead_channels, num_classes, 3, padding=1)

    @classmethod
    def from_config(cls, cfg, embed_dim: int, auxiliary: bool = False) -> nn.Module:  # noqa: ANN001
        node = cfg.MODEL.SETR
        if auxiliary:
            return SETRMLAAuxHead(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, mla_channels=node.MLA_CHANNELS)
        return cls(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, mla_channels=node.MLA_CHANNELS,
                   mlahead_channels=node.MLAHEAD_CHANNELS)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """(p2, p3, p4, p5) ``[B, mla_channels, h, w]`` → logits ``[B, K, 4h, 4w]``."""
        heads = [_upsample(getattr(self.mlahead, f"head{level}")(m), 4, align_corners=True)
                 for level, m in zip((2, 3, 4, 5), maps)]
        return self.cls(torch.cat(heads, dim=1))


class SETRMLAAuxHead(nn.Module):
    """SETR-MLA's auxiliary head on one aggregated level: a 1×1 conv without bias (``aux``)."""

    def __init__(self, *, num_classes: int, mla_channels: int = 256) -> None:
        super().__init__()
        self.aux = nn.Conv2d(mla_channels, num_classes, 1, bias=False)

    def forward(self, level: Tensor) -> Tensor:
        return self.aux(level)
