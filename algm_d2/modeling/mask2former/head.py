"""Mask2Former's head on a feature pyramid (mmdet ``Mask2FormerHead`` as in EVA's ADE20K model) and the
plain-ViT decoder that cross-attends to ALGM's merged tokens and unmerges only its mask logits.

Predictions are dicts ``{"pred_logits" [B, Q, K+1], "pred_masks" [B, Q, h, w], "aux_outputs": [...]}``: one
prediction from the queries alone, then one after every decoder layer (the last is the output, the others deep
supervision).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...merge import MergeState
from ..merged_tokens import patch_key_bias, patches_to_grid
from ..registry import PIXEL_DECODER_REGISTRY, SEM_SEG_HEAD_REGISTRY, TRANSFORMER_DECODER_REGISTRY
from .layers import EmbeddingTable, MaskedDecoderLayer, PredictionHeads, sine_position_encoding, sine_position_map


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """Per-class scores ``[B, K, h, w]`` = Σ_q softmax(class)[q, k] (no "no object") · sigmoid(mask)[q]."""
    return torch.einsum("bqc,bqhw->bchw", pred_logits.float().softmax(-1)[..., :-1], pred_masks.float().sigmoid())


def _predictions(logits: List[Tensor], masks: List[Tensor]) -> Dict[str, Any]:
    return {"pred_logits": logits[-1], "pred_masks": masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])]}


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """The decoder layers and the final norm (mmdet names ``layers.{i}``, ``post_norm``); the head runs the loop."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, num_layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MaskedDecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(dim)

    @classmethod
    def from_config(cls, cfg) -> "MultiScaleMaskedTransformerDecoder":  # noqa: ANN001 - a CfgNode
        node = cfg.MODEL.MASK_FORMER
        if node.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1 (layers + 1), got {node.DEC_LAYERS}")
        return cls(dim=node.HIDDEN_DIM, num_heads=node.NHEADS, ffn_dim=node.DIM_FEEDFORWARD,
                   num_layers=node.DEC_LAYERS - 1, dropout=node.DROPOUT)


@SEM_SEG_HEAD_REGISTRY.register()
class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention decoder over its 3 levels (round robin), with mmdet's parameter names."""

    def __init__(self, *, pixel_decoder: nn.Module, transformer_decoder: MultiScaleMaskedTransformerDecoder,
                 num_classes: int, num_queries: int, hidden_dim: int, mask_dim: int, num_heads: int,
                 num_levels: int = 3) -> None:
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.query_embed = EmbeddingTable(num_queries, hidden_dim)
        self.query_feat = EmbeddingTable(num_queries, hidden_dim)
        self.level_embed = EmbeddingTable(num_levels, hidden_dim)
        heads = PredictionHeads(hidden_dim, num_classes, mask_dim)
        self.cls_embed, self.mask_embed = heads.cls_embed, heads.mask_embed

    @classmethod
    def from_config(cls, cfg, in_channels: Sequence[int]) -> "Mask2FormerHead":  # noqa: ANN001 - a CfgNode
        head, node = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
        if head.MASK_DIM != head.CONVS_DIM or node.HIDDEN_DIM != head.CONVS_DIM:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.CONVS_DIM ({head.CONVS_DIM}), MASK_DIM ({head.MASK_DIM}) and "
                             f"MODEL.MASK_FORMER.HIDDEN_DIM ({node.HIDDEN_DIM}) must be equal (no input projections)")
        pixel_decoder = PIXEL_DECODER_REGISTRY.get(head.PIXEL_DECODER_NAME).from_config(cfg, in_channels)
        decoder = TRANSFORMER_DECODER_REGISTRY.get(node.TRANSFORMER_DECODER_NAME).from_config(cfg)
        return cls(pixel_decoder=pixel_decoder, transformer_decoder=decoder, num_classes=head.NUM_CLASSES,
                   num_queries=node.NUM_OBJECT_QUERIES, hidden_dim=node.HIDDEN_DIM, mask_dim=head.MASK_DIM,
                   num_heads=node.NHEADS, num_levels=head.NUM_TRANSFORMER_LEVELS)

    def _predict(self, queries: Tensor, mask_features: Tensor, next_size: Sequence[int]):  # noqa: ANN202
        """post_norm → class logits, masks (query · mask features) and the next layer's attention mask."""
        out = self.transformer_decoder.post_norm(queries).transpose(0, 1)  # [B, Q, C]
        logits = self.cls_embed(out)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        blocked = F.interpolate(masks, size=tuple(next_size), mode="bilinear", align_corners=False)
        blocked = (blocked.sigmoid() < 0.5).flatten(2).repeat_interleave(self.num_heads, dim=0).detach()
        return logits, masks, blocked

    def forward(self, features: Sequence[Tensor]) -> Dict[str, Any]:
        mask_features, levels = self.pixel_decoder(features)
        b = mask_features.shape[0]
        memories, key_pos = [], []
        level_embed = self.level_embed()
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            memories.append(level.flatten(2).permute(2, 0, 1) + level_embed[i].view(1, 1, -1))
            pos = sine_position_map(b, h, w, level.shape[1] // 2, level.device).to(level.dtype)
            key_pos.append(pos.flatten(2).permute(2, 0, 1))
        queries = self.query_feat()[:, None].repeat(1, b, 1)
        query_pos = self.query_embed()[:, None].repeat(1, b, 1)
        logits, masks, blocked = self._predict(queries, mask_features, levels[0].shape[-2:])
        all_logits, all_masks = [logits], [masks]
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.num_levels
            blocked = blocked & ~blocked.all(-1, keepdim=True)  # a query blocked everywhere attends everywhere
            queries = layer(queries, memories[level], query_pos, key_pos[level], blocked)
            logits, masks, blocked = self._predict(queries, mask_features,
                                                   levels[(i + 1) % self.num_levels].shape[-2:])
            all_logits.append(logits)
            all_masks.append(masks)
        return _predictions(all_logits, all_masks)


@TRANSFORMER_DECODER_REGISTRY.register()
class MergedTokenMaskedTransformerDecoder(nn.Module):
    """Plain-ViT Mask2Former decoder on ALGM's merged tokens: a Mask2Former head that unmerges after the decoder.

    Keys/values of the cross-attention are the merged patch tokens (projected to ``hidden_dim``) with the additive
    key bias log(size) — a merged token weighs as its members would, exactly the attention to the unmerged grid (the
    decoder's design, whatever the encoder's ``prop_attn``) — and sine positions at their mean grid positions. Masks
    are per token (``mask_embed(query) · mask_proj(token)``), used for the masked attention and unmerged to the
    patch grid (one gather) for the outputs and the loss.
    """

    def __init__(self, *, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 num_heads: int = 8, ffn_dim: int = 2048, num_layers: int = 6, mask_dim: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.input_proj = nn.Linear(in_channels, hidden_dim) if in_channels != hidden_dim else nn.Identity()
        self.mask_proj = nn.Linear(in_channels, mask_dim)
        self.layers = nn.ModuleList([MaskedDecoderLayer(hidden_dim, num_heads, ffn_dim, dropout)
                                     for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(hidden_dim)
        self.query_embed = EmbeddingTable(num_queries, hidden_dim)
        self.query_feat = EmbeddingTable(num_queries, hidden_dim)
        self.heads = PredictionHeads(hidden_dim, num_classes, mask_dim)

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> "MergedTokenMaskedTransformerDecoder":  # noqa: ANN001
        node = cfg.MODEL.MASK_FORMER
        return cls(in_channels=in_channels, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                   hidden_dim=node.HIDDEN_DIM, num_queries=node.NUM_OBJECT_QUERIES, num_heads=node.NHEADS,
                   ffn_dim=node.DIM_FEEDFORWARD, num_layers=node.DEC_LAYERS - 1,
                   mask_dim=cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, dropout=node.DROPOUT)

    def _predict(self, queries: Tensor, mask_features: Tensor, key_bias: Tensor):  # noqa: ANN202
        out = self.post_norm(queries).transpose(0, 1)
        logits = self.heads.cls_embed(out)
        masks = torch.einsum("bqc,btc->bqt", self.heads.mask_embed(out), mask_features)
        blocked = (masks.sigmoid() < 0.5).detach()
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        bias = key_bias.masked_fill(blocked, float("-inf")).repeat_interleave(self.num_heads, dim=0)
        return logits, masks, bias

    def forward(self, tokens: Tensor, state: MergeState) -> Dict[str, Any]:
        """``tokens`` ``[B, T-P, C]`` (merged patch tokens, prefix removed) → predictions, masks on the patch grid."""
        b = tokens.shape[0]
        h, w = state.grid_size
        p = state.num_prefix
        memory = self.input_proj(tokens).transpose(0, 1)
        key_pos = sine_position_encoding(state.positions[:, p:], (h, w), memory.shape[-1] // 2).to(memory.dtype)
        key_pos = key_pos.transpose(0, 1)
        mask_features = self.mask_proj(tokens)
        bias = patch_key_bias(state, True, memory.dtype)  # log(size); padding slots (size 0) get -inf
        key_bias = (memory.new_zeros(b, 1, tokens.shape[1]) if bias is None else bias[:, 0]).expand(
            -1, self.query_feat.num_embeddings, -1)
        queries = self.query_feat()[:, None].repeat(1, b, 1)
        query_pos = self.query_embed()[:, None].repeat(1, b, 1)
        logits, masks, bias = self._predict(queries, mask_features, key_bias)
        all_logits, all_masks = [logits], [masks]
        for layer in self.layers:
            queries = layer(queries, memory, query_pos, key_pos, bias)
            logits, masks, bias = self._predict(queries, mask_features, key_bias)
            all_logits.append(logits)
            all_masks.append(masks)
        # per-token mask logits [B, Q, T-P] unmerged to the patch grid [B, Q, H, W]
        grids = [patches_to_grid(m.transpose(1, 2), state) for m in all_masks]
        return _predictions(all_logits, grids)


