"""Multi-scale deformable attention (Deformable DETR, used by ViT-Adapter and Mask2Former's pixel decoder).

The op: for every query, head, level and point, bilinearly sample the head's value map at a location in [0, 1]²
(``pixel = location * size - 0.5``, zero outside; the CUDA kernel's and ``grid_sample(align_corners=False)``'s
convention) and sum the samples weighted by the attention weights.

Shapes (B batch, S = Σ h_l·w_l value tokens, M heads, D channels per head, Lq queries, L levels, P points):
``value [B, S, M, D]``, ``spatial_shapes`` a list of L (h, w), ``locations [B, Lq, M, L, P, 2]`` as (x, y),
``weights [B, Lq, M, L, P]`` → ``[B, Lq, M*D]``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Sequence[Tuple[int, int]]


def ms_deform_attn_reference(value: Tensor, spatial_shapes: SpatialShapes, locations: Tensor, weights: Tensor
                             ) -> Tensor:
    """The pure-PyTorch op: one ``grid_sample`` per level over (B·M) maps, then the weighted sum over L·P."""
    b, s, m, d = value.shape
    _, lq, _, num_levels, p, _ = locations.shape
    if s != sum(h * w for h, w in spatial_shapes) or num_levels != len(spatial_shapes):
        raise ValueError(f"value has {s} tokens and locations {num_levels} levels, spatial_shapes {list(spatial_shapes)}"
                         " describe another layout")
    grids = 2 * locations - 1
    samples = []
    for level, map_value in enumerate(value.split([h * w for h, w in spatial_shapes], dim=1)):
        h, w = spatial_shapes[level]
        maps = map_value.permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(b * m, lq, p, 2)
        samples.append(F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # [B·M, D, Lq, L·P]
    attn = weights.transpose(1, 2).reshape(b * m, 1, lq, num_levels * p).to(stacked.dtype)
    out = (stacked * attn).sum(-1).view(b, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, locations: Tensor, weights: Tensor, *,
                   impl: str = "auto") -> Tensor:
    """Multi-scale deformable attention; ``impl`` "auto" (the Triton kernel on CUDA, else the reference),
    "reference" or "triton". The op runs in float32 (as the original CUDA kernel), output in ``value``'s dtype."""
    if impl not in ("auto", "reference", "triton"):
        raise ValueError(f"MSDA impl must be 'auto', 'reference' or 'triton', got {impl!r}")
    dtype = value.dtype
    value, locations, weights = value.float(), locations.float(), weights.float()
    use_triton = impl == "triton" or (impl == "auto" and value.is_cuda)
    if use_triton:
        from .msda_triton import ms_deform_attn_triton  # noqa: PLC0415 - triton is imported only where it runs

        out = ms_deform_attn_triton(value, spatial_shapes, locations, weights)
    else:
        out = ms_deform_attn_reference(value, spatial_shapes, locations, weights)
    return out.to(dtype)


def level_start_index(spatial_shapes: SpatialShapes) -> List[int]:
    """Offset of each level's first token in the flattened value."""
    starts, total = [], 0
    for h, w in spatial_shapes:
        starts.append(total)
        total += h * w
    return starts


class MSDeformAttn(nn.Module):
    """Deformable-DETR / mmcv ``MultiScaleDeformableAttention`` parameters and math (mmcv key names), no residual.

    The steps are exposed separately because ALGM's injector computes offsets and weights on merged tokens but
    samples at each grid cell's own reference point (see ``backbone/vit_adapter.py``).

    Args:
        embed_dims: query / input channels.
        num_heads, num_levels, num_points: M, L, P.
        value_ratio: value channels = ``embed_dims * value_ratio`` (ViT-Adapter's ``deform_ratio``).
        impl: the op implementation, see :func:`ms_deform_attn`.
    """

    def __init__(self, *, embed_dims: int, num_heads: int, num_levels: int, num_points: int,
                 value_ratio: float = 1.0, impl: str = "auto") -> None:
        super().__init__()
        value_dims = int(embed_dims * value_ratio)
        if value_dims % num_heads:
            raise ValueError(f"value channels {value_dims} (embed_dims {embed_dims} × ratio {value_ratio}) are not "
                             f"divisible by num_heads {num_heads}")
        self.embed_dims, self.num_heads, self.num_levels, self.num_points = embed_dims, num_heads, num_levels, num_points
        self.value_dims = value_dims
        self.impl = impl
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, value_dims)
        self.output_proj = nn.Linear(value_dims, embed_dims)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions (k+1 pixels out), uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        ring = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        ring *= torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def offsets_and_weights(self, query: Tensor) -> Tuple[Tensor, Tensor]:
        """``query [B, Lq, C]`` → pixel offsets ``[B, Lq, M, L, P, 2]`` and softmaxed weights ``[B, Lq, M, L, P]``."""
        b, lq, _ = query.shape
        m, num_levels, p = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(b, lq, m, num_levels, p, 2)
        weights = self.attention_weights(query).view(b, lq, m, num_levels * p).softmax(-1)
        return offsets, weights.view(b, lq, m, num_levels, p)

    @staticmethod
    def locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: SpatialShapes) -> Tensor:
        """Reference points ``[B or 1, Lq, L or 1, 2]`` (x, y in [0, 1]) + pixel offsets → sampling locations."""
        normalizer = offsets.new_tensor([[w, h] for h, w in spatial_shapes])  # [L, 2] as (x, y)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]

    def project_value(self, value_input: Tensor) -> Tensor:
        """``value_input [B, S, C]`` → per-head value ``[B, S, M, D]``."""
        b, s, _ = value_input.shape
        return self.value_proj(value_input).view(b, s, self.num_heads, self.value_dims // self.num_heads)

    def sample(self, value: Tensor, spatial_shapes: SpatialShapes, locations: Tensor, weights: Tensor) -> Tensor:
        """The op on projected values → ``[B, Lq, value_dims]`` (before ``output_proj``)."""
        return ms_deform_attn(value, spatial_shapes, locations, weights, impl=self.impl)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: SpatialShapes,
                value: Optional[Tensor] = None) -> Tensor:
        """``output_proj(MSDA(query, reference_points, value_proj(value_input)))`` → ``[B, Lq, embed_dims]``.

        ``value`` (already projected, ``[B, S, M, D]``) replaces ``value_input`` when given.
        """
        offsets, weights = self.offsets_and_weights(query)
        locations = self.locations(reference_points, offsets, spatial_shapes)
        value = self.project_value(value_input) if value is None else value
        return self.output_proj(self.sample(value, spatial_shapes, locations, weights))
