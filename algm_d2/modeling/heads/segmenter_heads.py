"""Segmenter's decoders on (merged) patch tokens; both unmerge their per-token outputs back to the grid.

The network passes its ``ALGMConfig.prop_attn`` to ``forward``: with it the mask transformer's attention adds
log(size) to each merged key's logits, as the encoder's blocks do.

Key names follow the Segmenter release (``decoder.blocks.i.*``, ``cls_emb``, ``proj_dec``, ``proj_patch``,
``proj_classes``, ``decoder_norm``, ``mask_norm``; ``head`` for the linear decoder) so its checkpoints load as is.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ...merge import MergeState
from ...merge.packing import PackedLayout
from ...merge.state import attention_dtype
from ..merged_tokens import patch_key_bias, patches_to_grid
from ..ops.packed_layout import build_layout
from ..ops.varlen_attention import packed_attention_residual
from ..registry import SEM_SEG_HEAD_REGISTRY


def init_segmenter_weights(module: nn.Module) -> None:
    """The release's init: truncated-normal(0.02) linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@SEM_SEG_HEAD_REGISTRY.register()
class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: class embeddings attend jointly with the patch tokens; masks are cosine
    similarities of projected patch and class features, normalised per token, then unmerged to the grid.

    It runs on merged tokens (ALGM unmerges after this decoder): per-token masks are gathered back to the grid.
    A padded per-image batch runs packed in inference (``packed_attention``): each image's class tokens and valid
    patch tokens back to back, variable-length attention, no padding and no key mask.
    """

    def __init__(self, *, num_classes: int, encoder_dim: int, dim: int, depth: int = 2, num_heads: int = 0,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, drop_path_rate: float = 0.0,
                 packed_attention: bool = True) -> None:
        super().__init__()
        num_heads = num_heads or dim // 64
        self.num_classes = num_classes
        self.packed_attention = packed_attention
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
                  drop_path=rate, norm_layer=nn.LayerNorm)
            for rate in rates
        ])
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim))
        self.proj_dec = nn.Linear(encoder_dim, dim)
        scale = dim ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(scale * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        self.apply(init_segmenter_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    @classmethod
    def from_config(cls, cfg, encoder_dim: int) -> "MaskTransformer":  # noqa: ANN001 - a CfgNode
        head = cfg.MODEL.SEM_SEG_HEAD
        dim = head.HIDDEN_DIM or encoder_dim
        return cls(num_classes=head.NUM_CLASSES, encoder_dim=encoder_dim, dim=dim, depth=head.NUM_LAYERS,
                   num_heads=head.NUM_HEADS, dropout=head.DROPOUT, drop_path_rate=head.DROP_PATH_RATE)

    def forward(self, patches: Tensor, state: MergeState, *, prop_attn: bool = False) -> Tensor:
        """Merged patch tokens ``[B, N', C]`` → class masks on the patch grid ``[B, K, h, w]``; ``prop_attn``: the
        network's ``ALGMConfig.prop_attn``."""
        x = self.proj_dec(patches)
        classes = self.cls_emb.expand(x.shape[0], -1, -1)
        # the variable-length kernels take no key bias: proportional attention runs padded
        layout = None if prop_attn else self._packed_layout(state)
        if layout is not None:
            # class tokens first, so that each image's valid tokens lead its row (the decoder has no positions:
            # the order changes nothing but the order of the sums)
            packed = layout.pack(torch.cat([classes, x], dim=1))
            for block in self.blocks:
                packed = packed_attention_residual(block, packed, layout)
                packed = packed + block.drop_path2(block.ls2(block.mlp(block.norm2(packed))))
            x = layout.unpack(self.decoder_norm(packed))
            patch_x, class_x = x[:, self.num_classes:], x[:, :self.num_classes]
        else:
            x = torch.cat([x, classes], dim=1)
            bias = patch_key_bias(state, prop_attn, attention_dtype(x))
            if bias is not None:
                bias = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], self.num_classes)], dim=-1)
            for block in self.blocks:
                x = block(x, attn_mask=bias)
            x = self.decoder_norm(x)
            patch_x, class_x = x[:, :-self.num_classes], x[:, -self.num_classes:]
        patch_feat = patch_x @ self.proj_patch
        class_feat = class_x @ self.proj_classes
        patch_feat = patch_feat / patch_feat.norm(dim=-1, keepdim=True)
        class_feat = class_feat / class_feat.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patch_feat @ class_feat.transpose(1, 2))
        return patches_to_grid(masks, state)

    def _packed_layout(self, state: MergeState) -> Optional[PackedLayout]:
        """Layout of ``[class tokens, valid patch tokens]`` per image for a padded per-image batch in inference
        (asked only without proportional attention), else None."""
        if not (self.packed_attention and not self.training and state.padded
                and state.total_tokens is not None):
            return None
        batch, seq_len = state.sizes.shape
        extra = self.num_classes - state.num_prefix  # class tokens in, prefix tokens out
        return PackedLayout.from_counts(state.num_tokens + extra, seq_len + extra, state.total_tokens + batch * extra,
                                        build_layout)


@SEM_SEG_HEAD_REGISTRY.register()
class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear layer per (merged) token, unmerged to the grid."""

    def __init__(self, *, num_classes: int, encoder_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(encoder_dim, num_classes)
        self.apply(init_segmenter_weights)

    @classmethod
    def from_config(cls, cfg, encoder_dim: int) -> "LinearDecoder":  # noqa: ANN001 - a CfgNode
        return cls(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, encoder_dim=encoder_dim)

    def forward(self, patches: Tensor, state: MergeState, *, prop_attn: bool = False) -> Tensor:
        """``prop_attn`` is taken for the decoders' common call and changes nothing: no attention here."""
        return patches_to_grid(self.head(patches), state)
