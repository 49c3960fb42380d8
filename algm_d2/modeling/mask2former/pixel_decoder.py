"""Mask2Former's multi-scale deformable-attention pixel decoder (mmdet ``MSDeformAttnPixelDecoder``, mmcv names).

Input: backbone maps at strides 4, 8, 16, 32. The lowest-resolution levels (default 3) are projected (1×1 conv + GN),
flattened with sine + level encodings and refined by post-norm deformable-attention encoder layers; the refined
stride-8 map is upsampled onto the lateral projection of the stride-4 map (FPN step, 3×3 conv + GN + ReLU) and a 1×1
conv gives the mask features. Output: ``(mask_features [B, MASK_DIM, H/4, W/4], [maps at 1/32, 1/16, 1/8])``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.msda import MSDeformAttn
from ..registry import PIXEL_DECODER_REGISTRY
from .layers import FFN, EmbeddingTable, sine_position_map


class ConvNorm(nn.Module):
    """mmcv ``ConvModule``: ``conv`` → GroupNorm(32) ``gn`` → optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, *, bias: bool, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.gn = nn.GroupNorm(32, cout)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class DeformableEncoderLayer(nn.Module):
    """``x = LN(x + MSDA(query=x+pos, value=x))``, ``x = LN(x + FFN(x))`` (mmcv ``BaseTransformerLayer``)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int, impl: str) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([MSDeformAttn(embed_dims=dim, num_heads=num_heads, num_levels=num_levels,
                                                      num_points=num_points, impl=impl)])
        self.ffns = nn.ModuleList([FFN(dim, ffn_dim)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim)])

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, shapes: List[Tuple[int, int]]) -> Tensor:
        x = self.norms[0](x + self.attentions[0](x + pos, reference_points, x, shapes))
        return self.norms[1](self.ffns[0](x))


class DeformableEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer: object) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer) for _ in range(num_layers)])


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Args: in_channels (per input level, strides 4..32), feat_channels (CONVS_DIM), out_channels (MASK_DIM),
    num_encoder_levels, encoder layers/heads/points/FFN width, msda_impl."""

    def __init__(self, *, in_channels: Sequence[int], feat_channels: int = 256, out_channels: int = 256,
                 num_encoder_levels: int = 3, num_layers: int = 6, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 1024, msda_impl: str = "auto") -> None:
        super().__init__()
        self.num_input_levels = len(in_channels)
        self.num_encoder_levels = num_encoder_levels
        if not 1 <= num_encoder_levels < self.num_input_levels:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_TRANSFORMER_LEVELS {num_encoder_levels} must be in "
                             f"1..{self.num_input_levels - 1} for {self.num_input_levels} backbone levels")
        self.feat_channels = feat_channels
        # Highest level (lowest resolution) first, as mmdet.
        self.input_convs = nn.ModuleList([
            ConvNorm(in_channels[self.num_input_levels - 1 - i], feat_channels, 1, bias=True, relu=False)
            for i in range(num_encoder_levels)])
        self.encoder = DeformableEncoder(num_layers, dim=feat_channels, num_heads=num_heads,
                                         num_levels=num_encoder_levels, num_points=num_points, ffn_dim=ffn_dim,
                                         impl=msda_impl)
        self.level_encoding = EmbeddingTable(num_encoder_levels, feat_channels)
        fpn_levels = range(self.num_input_levels - num_encoder_levels - 1, -1, -1)
        self.lateral_convs = nn.ModuleList([ConvNorm(in_channels[i], feat_channels, 1, bias=False, relu=False)
                                            for i in fpn_levels])
        self.output_convs = nn.ModuleList([ConvNorm(feat_channels, feat_channels, 3, bias=False, relu=True)
                                           for _ in fpn_levels])
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, 1)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """mmdet's init: Xavier for the 1×1 input projections, Kaiming for the FPN convs, normal level encodings."""
        for conv in self.input_convs:
            nn.init.xavier_uniform_(conv.conv.weight)
            nn.init.zeros_(conv.conv.bias)
        for conv in list(self.lateral_convs) + list(self.output_convs):
            nn.init.kaiming_uniform_(conv.conv.weight, a=1)
        nn.init.kaiming_uniform_(self.mask_feature.weight, a=1)
        nn.init.zeros_(self.mask_feature.bias)
        nn.init.normal_(self.level_encoding.weight)
        for layer in self.encoder.layers:
            for linear in (layer.ffns[0].layers[0][0], layer.ffns[0].layers[1]):
                nn.init.xavier_uniform_(linear.weight)

    @classmethod
    def from_config(cls, cfg, in_channels: Sequence[int]) -> "MSDeformAttnPixelDecoder":  # noqa: ANN001
        head = cfg.MODEL.SEM_SEG_HEAD
        return cls(in_channels=in_channels, feat_channels=head.CONVS_DIM, out_channels=head.MASK_DIM,
                   num_encoder_levels=head.NUM_TRANSFORMER_LEVELS, num_layers=head.TRANSFORMER_ENC_LAYERS,
                   num_heads=head.ENC_NUM_HEADS, num_points=head.ENC_NUM_POINTS, ffn_dim=head.ENC_DIM_FEEDFORWARD,
                   msda_impl=head.MSDA_IMPL)

    def forward(self, features: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        b = features[0].shape[0]
        tokens, positions, shapes, points = [], [], [], []
        level_encoding = self.level_encoding()
        for i in range(self.num_encoder_levels):
            feat = features[self.num_input_levels - 1 - i]
            h, w = feat.shape[-2:]
            tokens.append(self.input_convs[i](feat).flatten(2).transpose(1, 2))
            pos = sine_position_map(b, h, w, self.feat_channels // 2, feat.device).to(feat.dtype)
            positions.append((pos + level_encoding[i].view(1, -1, 1, 1)).flatten(2).transpose(1, 2))
            shapes.append((h, w))
            ys, xs = torch.meshgrid(torch.arange(h, device=feat.device), torch.arange(w, device=feat.device),
                                    indexing="ij")
            points.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
        x, pos = torch.cat(tokens, 1), torch.cat(positions, 1)
        # Every query samples each level at its own normalized position (valid ratios are 1: no padding).
        reference_points = torch.cat(points)[None, :, None].expand(b, -1, self.num_encoder_levels, -1).to(x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, pos, reference_points, shapes)
        outs = [t.transpose(1, 2).reshape(b, -1, h, w) for t, (h, w) in zip(x.split([h * w for h, w in shapes], 1),
                                                                            shapes)]
        multi_scale = list(outs)
        for j, i in enumerate(range(self.num_input_levels - self.num_encoder_levels - 1, -1, -1)):
            lateral = self.lateral_convs[j](features[i])
            y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[j](y))
        return self.mask_feature(outs[-1]), multi_scale[: self.num_encoder_levels]
