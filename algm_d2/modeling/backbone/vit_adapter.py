"""ViT-Adapter (Chen et al., ICLR 2023; EVA's ``BEiTAdapter``) around the ALGM backbone.

A convolutional spatial prior module (SPM) builds a 3-level token pyramid ``c`` (strides 8/16/32). Each of the
interactions runs: injector (ViT tokens query ``c`` with deformable attention) → a range of ViT blocks → extractor(s)
(``c`` queries the ViT tokens) with a ConvFFN. The output is a 4-level feature pyramid (strides 4/8/16/32).

With ALGM the ViT tokens stay merged through all blocks; the adapter touches the grid only where it needs a dense map:
- extractor: ``value_proj(feat_norm(x))`` runs on the merged tokens and is gathered to the grid (both act per token,
  so this equals unmerge → extract);
- outputs: the merged tokens are gathered to the grid after each interaction;
- injector: offsets and weights run on the merged tokens, are gathered to the grid cells, each cell samples at its
  own reference point, and the samples are averaged per merged slot before ``output_proj`` (affine), which equals
  unmerge → inject → size-weighted re-merge. Injector 0 runs before any merge.
Module and parameter names are the release's (``backbone.spm.*``, ``backbone.interactions.*``, timm's Eva names for
the blocks), so EVA's mmcv checkpoint loads without renaming.
"""
from __future__ import annotations

from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...merge import OFF, ALGMConfig, MergeState
from ...merge.state import row_sums
from ..merged_tokens import patches_to_grid
from ..ops.msda import MSDeformAttn, SpatialShapes
from ..registry import BACKBONE_REGISTRY
from .algm_vit import ALGMViT, TokenStream
from .build import algm_config_from_cfg, build_timm_vit


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in its running statistics' dtype, output in the input's.

    DeepSpeed's bf16/fp16 modes cast parameters but not buffers: normalising in the statistics' float32 keeps the
    running averages exact and avoids mixing dtypes. (The release uses SyncBatchNorm; in evaluation both are this.)
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.running_mean.dtype
        if self.training:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(x.to(dtype), self.running_mean, self.running_var, self.weight.to(dtype),
                           self.bias.to(dtype), self.training, self.momentum, self.eps)
        return out.to(x.dtype)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """ResNet-like stem → c1 map (stride 4) and c2/c3/c4 token sequences (strides 8/16/32), all ``embed_dim`` wide."""

    def __init__(self, *, inplanes: int = 64, embed_dim: int = 384) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, inplanes, 2), *_conv_bn_relu(inplanes, inplanes, 1),
                                  *_conv_bn_relu(inplanes, inplanes, 1), nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, images: Tensor) -> Tuple[Tensor, List[Tensor]]:
        c1 = self.stem(images)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]
        return self.fc1(c1), tokens


def reference_points(spatial_shapes: SpatialShapes, device: torch.device) -> Tensor:
    """Cell centres ``((x+0.5)/w, (y+0.5)/h)`` of each level, concatenated → ``[1, Σ h·w, 1, 2]``."""
    points = []
    for h, w in spatial_shapes:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        points.append(torch.stack([(xs.reshape(-1) + 0.5) / w, (ys.reshape(-1) + 0.5) / h], -1))
    return torch.cat(points)[None, :, None]


class DWConv(nn.Module):
    """One 3×3 depthwise conv applied to each pyramid level of a token sequence (levels given by their shapes)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, level_shapes: SpatialShapes) -> Tensor:
        b, _, c = x.shape
        levels = x.split([h * w for h, w in level_shapes], dim=1)
        out = [self.dwconv(t.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
               for t, (h, w) in zip(levels, level_shapes)]
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """fc1 → depthwise 3×3 per level → GELU → fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, level_shapes: SpatialShapes) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), level_shapes)))


def slot_mean(values: Tensor, state: MergeState) -> Tensor:
    """Per-cell values ``[B, H*W, C]`` → their mean per merged patch slot ``[B, T - P, C]`` (0 on padding)."""
    b, _, c = values.shape
    num_slots = state.seq_len - state.num_prefix
    slots = state.index_map - state.num_prefix + torch.arange(b, device=values.device)[:, None] * num_slots
    sums = row_sums(values.flatten(0, 1), slots.flatten(), b * num_slots).view(b, num_slots, c)
    return sums / state.sizes[:, state.num_prefix:, None].clamp(min=1.0).to(sums.dtype)


class Injector(nn.Module):
    """ViT tokens ← SPM pyramid: ``x + gamma * MSDA(LN(x), reference points, LN(c))`` (no FFN)."""

    def __init__(self, *, dim: int, num_heads: int, num_points: int, num_levels: int = 3,
                 value_ratio: float = 0.5, init_values: float = 0.0, impl: str = "auto") -> None:
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(embed_dims=dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                                 value_ratio=value_ratio, impl=impl)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, patches: Tensor, state: MergeState, points: Tensor, feat: Tensor,
                spatial_shapes: SpatialShapes) -> Tensor:
        """``patches [B, T-P, C]`` (merged ViT tokens without prefix), ``points`` the grid cells' reference points."""
        if not state.merged:
            out = self.attn(self.query_norm(patches), points, self.feat_norm(feat), spatial_shapes)
            return patches + self.gamma * out
        offsets, weights = self.attn.offsets_and_weights(self.query_norm(patches))
        offsets = state.unmerge_patches(offsets.flatten(2)).view(offsets.shape[0], -1, *offsets.shape[2:])
        weights = state.unmerge_patches(weights.flatten(2)).view(weights.shape[0], -1, *weights.shape[2:])
        locations = self.attn.locations(points, offsets, spatial_shapes)
        samples = self.attn.sample(self.attn.project_value(self.feat_norm(feat)), spatial_shapes, locations, weights)
        return patches + self.gamma * self.attn.output_proj(slot_mean(samples, state))


class Extractor(nn.Module):
    """SPM pyramid ← ViT tokens: ``c + MSDA(LN(c), reference points, LN(x) as a grid map)``, then ``c + ConvFFN(LN(c))``."""

    def __init__(self, *, dim: int, num_heads: int, num_points: int, value_ratio: float = 0.5,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, impl: str = "auto") -> None:
        super().__init__()
        self.query_norm = _layer_norm(dim)
        self.feat_norm = _layer_norm(dim)
        self.attn = MSDeformAttn(embed_dims=dim, num_heads=num_heads, num_levels=1, num_points=num_points,
                                 value_ratio=value_ratio, impl=impl)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = _layer_norm(dim)

    def forward(self, c: Tensor, points: Tensor, patches: Tensor, state: MergeState, grid: Tuple[int, int],
                level_shapes: SpatialShapes) -> Tensor:
        value = self.attn.project_value(self.feat_norm(patches))  # per merged token: LN and linear act per token
        if state.merged:
            value = state.unmerge_patches(value.flatten(2)).view(value.shape[0], -1, *value.shape[2:])
        c = c + self.attn(self.query_norm(c), points, None, [grid], value=value)
        if self.with_cffn:
            c = c + self.ffn(self.ffn_norm(c), level_shapes)
        return c


class InteractionBlock(nn.Module):
    """Injector → (a range of ViT blocks) → extractor (+ extra extractors); names as ViT-Adapter's ``*WithCls``."""

    def __init__(self, *, dim: int, num_heads: int, num_points: int, value_ratio: float, init_values: float,
                 with_cffn: bool, cffn_ratio: float, extra_extractor: bool, impl: str) -> None:
        super().__init__()
        self.injector = Injector(dim=dim, num_heads=num_heads, num_points=num_points, value_ratio=value_ratio,
                                 init_values=init_values, impl=impl)
        extractor = dict(dim=dim, num_heads=num_heads, num_points=num_points, value_ratio=value_ratio,
                         with_cffn=with_cffn, cffn_ratio=cffn_ratio, impl=impl)
        self.extractor = Extractor(**extractor)
        self.extra_extractors = (nn.Sequential(Extractor(**extractor), Extractor(**extractor)) if extra_extractor
                                 else None)

    def extractors(self) -> List[Extractor]:
        return [self.extractor] + (list(self.extra_extractors) if self.extra_extractors is not None else [])


# The ViT's final norms: the adapter's per-level norms take their place (not in the release's checkpoints).
UNUSED_VIT_PARTS = ("norm", "fc_norm")


@BACKBONE_REGISTRY.register()
class ViTAdapter(nn.Module):
    """EVA/ViT + ViT-Adapter with ALGM; ``forward(images) -> ([f1, f2, f3, f4] at strides 4..32, MergeState)``.

    The ViT is an :class:`ALGMViT` (:attr:`vit`) that the adapter drives between its interactions through
    ``embed``, ``start`` and ``run_blocks``, as ViTDet's simple feature pyramid holds its ViT. Its modules and
    parameters are adopted as this module's own (same objects), so parameter and state_dict names are the release's
    (``blocks.*``, ``patch_embed.*``, ``cls_token`` beside ``spm.*``, ``interactions.*``), with no ``vit.`` prefix.

    Args:
        vit: a timm ``Eva`` (EVA-01, EVA-02) or ``VisionTransformer`` with a class token; its final norm is unused.
        interaction_indexes: inclusive 0-based block ranges, one per interaction, covering the blocks in order.
        conv_inplane, deform_num_heads, n_points, deform_ratio, cffn_ratio, with_cffn, init_values,
        extra_extractor, add_vit_feature: ViT-Adapter's settings (EVA: 64, 16, 4, 0.5, 0.25, True, 0, True, True).
        msda_impl: deformable attention implementation ("auto", "reference", "triton").
        algm, pos_embed_interp, activation_checkpointing, cuda_graphs, cuda_graph_buckets: as :class:`ALGMViT`.
    """

    vit: ALGMViT

    def __init__(self, *, vit: nn.Module, interaction_indexes: Sequence[Sequence[int]], conv_inplane: int = 64,
                 deform_num_heads: int = 16, n_points: int = 4, deform_ratio: float = 0.5, cffn_ratio: float = 0.25,
                 with_cffn: bool = True, init_values: float = 0.0, extra_extractor: bool = True,
                 add_vit_feature: bool = True, msda_impl: str = "auto", algm: ALGMConfig = OFF,
                 pos_embed_interp: str = "bicubic", activation_checkpointing: bool = False,
                 cuda_graphs: bool = True, cuda_graph_buckets: int = 16) -> None:
        super().__init__()
        encoder = ALGMViT(vit=vit, algm=algm, pos_embed_interp=pos_embed_interp,
                          activation_checkpointing=activation_checkpointing, cuda_graphs=cuda_graphs,
                          cuda_graph_buckets=cuda_graph_buckets)
        if encoder.num_prefix_tokens != 1 or encoder.cls_token is None:
            raise ValueError("ViTAdapter expects a ViT with exactly one class token and no register tokens")
        ranges = [tuple(int(i) for i in r) for r in interaction_indexes]
        expected = 0
        for first, last in ranges:
            if first != expected or last < first:
                raise ValueError(f"MODEL.VIT_ADAPTER.INTERACTION_INDEXES {ranges} must split blocks "
                                 f"0..{encoder.depth - 1} into consecutive inclusive ranges")
            expected = last + 1
        if expected != encoder.depth:
            raise ValueError(f"MODEL.VIT_ADAPTER.INTERACTION_INDEXES {ranges} cover {expected} blocks, the ViT has "
                             f"{encoder.depth}")
        if add_vit_feature and len(ranges) != 4:
            raise ValueError(f"MODEL.VIT_ADAPTER.ADD_VIT_FEATURE adds one interaction output per pyramid level: "
                             f"INTERACTION_INDEXES needs 4 ranges, got {len(ranges)}")
        self._adopt(encoder)
        self.interaction_indexes = ranges
        self.add_vit_feature = add_vit_feature
        dim = encoder.embed_dim
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(inplanes=conv_inplane, embed_dim=dim)
        self.interactions = nn.Sequential(*[
            InteractionBlock(dim=dim, num_heads=deform_num_heads, num_points=n_points, value_ratio=deform_ratio,
                             init_values=init_values, with_cffn=with_cffn, cffn_ratio=cffn_ratio,
                             extra_extractor=extra_extractor and i == len(ranges) - 1, impl=msda_impl)
            for i in range(len(ranges))
        ])
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (BatchNorm2d(dim) for _ in range(4))
        self._init_adapter_weights()

    def _adopt(self, encoder: ALGMViT) -> None:
        """Hold ``encoder`` outside the module tree (nothing registered twice) and adopt its parts as this module's."""
        object.__setattr__(self, "vit", encoder)
        # One table of top-level tensors (class token, position embedding; the level embedding joins it, unread by the
        # ViT) for both: conversions, assign-loads and re-assignment replace them for the ViT too.
        self._parameters, self._buffers = encoder._parameters, encoder._buffers
        self._non_persistent_buffers_set = encoder._non_persistent_buffers_set
        for name, child in encoder.named_children():
            if name not in UNUSED_VIT_PARTS:
                self.add_module(name, child)

    def train(self, mode: bool = True) -> "ViTAdapter":
        super().train(mode)
        self.vit.train(mode)  # its own flag decides activation checkpointing, packing and graphs
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "ViTAdapter":
        # .to() / .half() may give the ViT's parameters new storage, which its captured block graphs would not see
        if self.vit.block_graphs is not None:
            self.vit.block_graphs.clear()
        return super()._apply(fn, recurse)

    @property
    def algm(self) -> ALGMConfig:
        return self.vit.algm

    @algm.setter
    def algm(self, config: ALGMConfig) -> None:
        self.vit.algm = config

    @property
    def depth(self) -> int:
        return self.vit.depth

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> Tuple[int, int]:
        return self.vit.patch_size

    @property
    def kinds(self) -> List[str]:
        """The ViT's block kinds (pretrained loading picks timm's checkpoint filter by them)."""
        return self.vit.kinds

    @property
    def vit_state_keys(self) -> FrozenSet[str]:
        """The ViT's own state_dict keys (pretrained loading initialises only these)."""
        return self.vit.vit_state_keys

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def no_embed_class(self) -> bool:
        return self.vit.no_embed_class

    @classmethod
    def from_config(cls, cfg) -> "ViTAdapter":  # noqa: ANN001 - a CfgNode
        node, backbone = cfg.MODEL.VIT_ADAPTER, cfg.MODEL.BACKBONE
        return cls(vit=build_timm_vit(cfg), interaction_indexes=node.INTERACTION_INDEXES,
                   conv_inplane=node.CONV_INPLANE, deform_num_heads=node.DEFORM_NUM_HEADS, n_points=node.N_POINTS,
                   deform_ratio=node.DEFORM_RATIO, cffn_ratio=node.CFFN_RATIO, with_cffn=node.WITH_CFFN,
                   init_values=node.INIT_VALUES, extra_extractor=node.EXTRA_EXTRACTOR,
                   add_vit_feature=node.ADD_VIT_FEATURE, msda_impl=cfg.MODEL.SEM_SEG_HEAD.MSDA_IMPL,
                   algm=algm_config_from_cfg(cfg), pos_embed_interp=backbone.POS_EMBED_INTERP,
                   activation_checkpointing=backbone.ACTIVATION_CHECKPOINTING, cuda_graphs=backbone.CUDA_GRAPHS,
                   cuda_graph_buckets=backbone.CUDA_GRAPH_BUCKETS)

    @torch.no_grad()
    def _init_adapter_weights(self) -> None:
        """ViT-Adapter's init for the new parts (the ViT keeps its own): normal level embeds, trunc-normal linears,
        He-normal convs, then Deformable DETR's init for every deformable attention."""
        nn.init.normal_(self.level_embed)
        for module in (self.spm, self.interactions, self.up):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                    nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    def _embed(self, images: Tensor) -> Tuple[Tensor, Tuple[int, int], Optional[Tensor]]:
        """The ViT's embedding ``[B, 1 + h*w, C]`` with a bare class token (the release adds it no position)."""
        x, grid, rope = self.vit.embed(images)
        return torch.cat([self.vit.cls_token.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1), grid, rope

    def forward(self, images: Tensor, observer=None, algm: Optional[ALGMConfig] = None  # noqa: ANN001
                ) -> Tuple[List[Tensor], MergeState]:
        ph, pw = self.patch_size
        if images.shape[-2] % (2 * ph) or images.shape[-1] % (2 * pw):
            raise ValueError(f"ViTAdapter needs H and W divisible by {2 * ph}×{2 * pw} (the SPM's stride-32 level "
                             f"must align with the patch grid); got {tuple(images.shape[-2:])}")
        c1, (c2, c3, c4) = self.spm(images)
        level_tokens = [c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]]
        x, grid, grid_rope = self._embed(images)
        h, w = grid
        level_shapes = [(2 * h, 2 * w), (h, w), (h // 2, w // 2)]
        injector_points = reference_points([grid], images.device)
        extractor_points = reference_points(level_shapes, images.device)
        c = torch.cat(level_tokens, dim=1)
        stream = self.vit.start(x, grid, grid_rope, algm)
        outs = []
        for interaction, (first, last) in zip(self.interactions, self.interaction_indexes):
            patches = interaction.injector(stream.x[:, 1:], stream.state, injector_points, c, level_shapes)
            stream.x = torch.cat([stream.x[:, :1], patches], dim=1)
            self.vit.run_blocks(stream, first, last + 1, observer)
            patches = stream.x[:, 1:]
            for extractor in interaction.extractors():
                c = extractor(c, extractor_points, patches, stream.state, grid, level_shapes)
            outs.append(self._patch_map(stream))
        return self._pyramid(c1, c, outs, level_shapes), stream.state

    @staticmethod
    def _patch_map(stream: TokenStream) -> Tensor:
        """The current patch tokens on the grid ``[B, C, h, w]`` (gathered from merged slots)."""
        return patches_to_grid(stream.x[:, 1:], stream.state)

    def _pyramid(self, c1: Tensor, c: Tensor, outs: List[Tensor], level_shapes: SpatialShapes) -> List[Tensor]:
        b, _, dim = c.shape
        c2, c3, c4 = (t.transpose(1, 2).reshape(b, dim, h, w)
                      for t, (h, w) in zip(c.split([h * w for h, w in level_shapes], dim=1), level_shapes))
        c1 = self.up(c2) + c1
        maps = [c1, c2, c3, c4]
        if self.add_vit_feature:
            maps = [m + (o if o.shape[-2:] == m.shape[-2:] else
                         F.interpolate(o, size=m.shape[-2:], mode="bilinear", align_corners=False))
                    for m, o in zip(maps, outs)]
        return [norm(m) for norm, m in zip((self.norm1, self.norm2, self.norm3, self.norm4), maps)]
