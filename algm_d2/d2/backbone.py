"""detectron2 ``Backbone``s of algm_d2's ALGM encoders, registered in detectron2's BACKBONE registry.

Each is algm_d2's own module with detectron2's backbone interface added (``Backbone`` as a second base), so its
parameter names are exactly algm_d2's (``backbone.blocks.0.attn.qkv.weight``, ``backbone.interactions.*``): the
same checkpoints load into either. Config names (MODEL.BACKBONE.NAME):

- ``build_algm_vit_backbone``: the timm ViT / EVA with ALGM; one output, ``"merged_tokens"`` (:class:`MergedTokens`:
  the merged patch tokens and their merge state) for heads that decode merged tokens.
- ``build_algm_vit_pyramid_backbone``: the same plus ViTDet's simple feature pyramid of the unmerged stride-16 map
  (``res2`` .. ``res5``, strides 4 .. 32) for Mask2Former's own pixel decoders.
- ``build_algm_vit_adapter_backbone``: EVA/ViT + ViT-Adapter with ALGM inside the ViT (``res2`` .. ``res5``).

Their settings are algm_d2's MODEL.BACKBONE / MODEL.ALGM / MODEL.VIT_ADAPTER keys (``add_algm_config``).
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, TypeVar

from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

from ..checkpoint.pretrained import load_pretrained_vit
from ..merge import MergeState
from ..modeling.backbone.algm_vit import ALGMViT
from ..modeling.backbone.vit_adapter import ViTAdapter
from ..modeling.merged_tokens import patches_to_grid

MERGED_TOKENS = "merged_tokens"
PYRAMID = ("res2", "res3", "res4", "res5")


class MergedTokens(NamedTuple):
    """The encoder's final-norm patch tokens ``[B, T - P, C]`` (merged; prefix tokens removed) and their state."""

    tokens: Tensor
    state: MergeState


def check_input_format(cfg) -> None:  # noqa: ANN001 - a CfgNode
    """algm_d2's encoders take RGB; detectron2 normalizes with MODEL.PIXEL_MEAN/STD in INPUT.FORMAT order."""
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"INPUT.FORMAT: algm_d2's encoders take RGB images, got {cfg.INPUT.FORMAT!r}; set "
                         "INPUT.FORMAT RGB with MODEL.PIXEL_MEAN / PIXEL_STD in RGB order")


class ALGMViTBackbone(ALGMViT, Backbone):
    """:class:`ALGMViT` as a detectron2 backbone: ``{"merged_tokens": MergedTokens}`` (stride = the patch size)."""

    def forward(self, images: Tensor) -> Dict[str, Any]:  # type: ignore[override]
        tokens, state = super().forward(images)
        return {MERGED_TOKENS: MergedTokens(tokens[:, state.num_prefix:], state)}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {MERGED_TOKENS: ShapeSpec(channels=self.embed_dim, stride=self.patch_size[0])}

    @property
    def size_divisibility(self) -> int:
        return self.patch_size[0]

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": 0}


class ALGMViTPyramidBackbone(ALGMViTBackbone):
    """:class:`ALGMViTBackbone` + ViTDet's simple pyramid (Li et al., 2022) of the unmerged grid: ``res2`` (two 2×2
    transposed convs), ``res3`` (one), ``res4`` (the grid), ``res5`` (2×2 max pool), each ``embed_dim`` wide; the
    merged tokens stay in the output too."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dim = self.embed_dim
        self.simple_pyramid = nn.ModuleDict({
            "res2": nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), LayerNorm(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2)),
            "res3": nn.ConvTranspose2d(dim, dim, 2, 2),
            "res4": nn.Identity(),
            "res5": nn.MaxPool2d(2, 2),
        })

    def forward(self, images: Tensor) -> Dict[str, Any]:  # type: ignore[override]
        outputs = super().forward(images)
        merged: MergedTokens = outputs[MERGED_TOKENS]
        grid = patches_to_grid(merged.tokens, merged.state)
        outputs.update({name: level(grid) for name, level in self.simple_pyramid.items()})
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        shapes = super().output_shape()
        patch = self.patch_size[0]
        shapes.update({name: ShapeSpec(channels=self.embed_dim, stride=stride)
                       for name, stride in zip(PYRAMID, (patch // 4, patch // 2, patch, 2 * patch))})
        return shapes

    @property
    def size_divisibility(self) -> int:
        return 2 * self.patch_size[0]


class ALGMViTAdapterBackbone(ViTAdapter, Backbone):
    """:class:`ViTAdapter` (ALGM inside its ViT) as a detectron2 backbone: ``res2`` .. ``res5`` at strides 4 .. 32."""

    def forward(self, images: Tensor) -> Dict[str, Tensor]:  # type: ignore[override]
        maps, _ = super().forward(images)
        return dict(zip(PYRAMID, maps))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self.embed_dim, stride=2 ** (i + 2)) for i, name in enumerate(PYRAMID)}

    @property
    def size_divisibility(self) -> int:
        return 2 * self.patch_size[0]

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": 0}


Encoder = TypeVar("Encoder", ALGMViT, ViTAdapter)


def with_pretrained(backbone: Encoder, cfg) -> Encoder:  # noqa: ANN001 - a CfgNode
    """MODEL.BACKBONE.PRETRAINED (timm / EVA weights) into the ViT; MODEL.WEIGHTS, loaded afterwards, wins."""
    if cfg.MODEL.BACKBONE.PRETRAINED:
        load_pretrained_vit(backbone, cfg.MODEL.BACKBONE.PRETRAINED)
    return backbone


@BACKBONE_REGISTRY.register()
def build_algm_vit_backbone(cfg, input_shape: ShapeSpec) -> ALGMViTBackbone:  # noqa: ANN001 - a CfgNode
    check_input_format(cfg)
    return with_pretrained(ALGMViTBackbone.from_config(cfg), cfg)


@BACKBONE_REGISTRY.register()
def build_algm_vit_pyramid_backbone(cfg, input_shape: ShapeSpec) -> ALGMViTPyramidBackbone:  # noqa: ANN001
    check_input_format(cfg)
    if cfg.MODEL.BACKBONE.PATCH_SIZE % 4:
        raise ValueError(f"MODEL.BACKBONE.PATCH_SIZE: the simple pyramid has strides patch/4 .. 2·patch, so the "
                         f"patch size must be divisible by 4; got {cfg.MODEL.BACKBONE.PATCH_SIZE}")
    return with_pretrained(ALGMViTPyramidBackbone.from_config(cfg), cfg)


@BACKBONE_REGISTRY.register()
def build_algm_vit_adapter_backbone(cfg, input_shape: ShapeSpec) -> ALGMViTAdapterBackbone:  # noqa: ANN001
    check_input_format(cfg)
    return with_pretrained(ALGMViTAdapterBackbone.from_config(cfg), cfg)

