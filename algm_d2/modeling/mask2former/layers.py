"""Mask2Former building blocks with mmcv's module names (EVA's checkpoints load without renaming).

``FFN`` is mmcv's (``layers.0.0`` / ``layers.1``, identity added), ``MaskedDecoderLayer`` mmdet's
``DetrTransformerDecoderLayer`` with the order (cross_attn, norm, self_attn, norm, ffn, norm), post-norm, and
``sine_position_encoding`` mmcv's ``SinePositionalEncoding(normalize=True)`` evaluated at any (row, col) positions.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


class EmbeddingTable(nn.Embedding):
    """An ``nn.Embedding`` used as a learned table: ``table()`` returns the whole weight ``[N, C]``.

    Reading the weight through the module's own call (not ``.weight`` from a parent) lets DeepSpeed ZeRO-3 gather
    it, as it gathers parameters module by module.
    """

    def forward(self) -> Tensor:  # noqa: D401 - the table itself
        return self.weight


class FFN(nn.Module):
    """``x + fc2(relu(fc1(x)))`` (mmcv ``FFN`` with ``add_identity``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)),
                                    nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class AttentionWithPos(nn.Module):
    """mmcv ``MultiheadAttention``: ``identity + attn(q + q_pos, k + k_pos, v)`` over (sequence, batch, C) tensors."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, query_pos: Optional[Tensor], key_pos: Optional[Tensor],
                attn_mask: Optional[Tensor] = None) -> Tensor:
        q = query if query_pos is None else query + query_pos
        k = key if key_pos is None else key + key_pos
        out = self.attn(q, k, value, attn_mask=attn_mask, need_weights=False)[0]
        return query + self.proj_drop(out)


class MaskedDecoderLayer(nn.Module):
    """Masked cross-attention to the memory → norm → self-attention → norm → FFN → norm.

    ``attn_mask`` ``[B*heads, Q, S]``: bool (True = blocked, Mask2Former) or float (added to the scores: blocked
    = -inf, plus e.g. ALGM's log-size bias).
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionWithPos(dim, num_heads, dropout),
                                         AttentionWithPos(dim, num_heads, dropout)])
        self.ffns = nn.ModuleList([FFN(dim, ffn_dim, dropout)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, query: Tensor, memory: Tensor, query_pos: Tensor, key_pos: Tensor,
                attn_mask: Optional[Tensor]) -> Tensor:
        x = self.norms[0](self.attentions[0](query, memory, memory, query_pos, key_pos, attn_mask))
        x = self.norms[1](self.attentions[1](x, x, x, query_pos, query_pos))
        return self.norms[2](self.ffns[0](x))


class PredictionHeads(nn.Module):
    """Class logits (K + 1 with "no object") and mask embeddings from the decoder's queries (mmdet names)."""

    def __init__(self, dim: int, num_classes: int, mask_dim: int) -> None:
        super().__init__()
        self.cls_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                        nn.ReLU(inplace=True), nn.Linear(dim, mask_dim))


def sine_position_encoding(positions: Tensor, grid_size: tuple, num_feats: int, temperature: float = 10000.0
                           ) -> Tensor:
    """mmcv's normalized sine encoding at (row, col) ``positions`` ``[..., 2]`` of an H×W grid → ``[..., 2*num_feats]``.

    On the grid (row, col = 0..H-1, 0..W-1) it is exactly ``SinePositionalEncoding(num_feats, normalize=True)``:
    the cumulative count (index + 1) divided by the side (+1e-6) times 2π; merged tokens use their mean position.
    """
    h, w = grid_size
    eps, scale = 1e-6, 2 * math.pi
    y = (positions[..., 0:1].float() + 1) / (h + eps) * scale
    x = (positions[..., 1:2].float() + 1) / (w + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)

    def embed(v: Tensor) -> Tensor:
        v = v / dim_t
        return torch.stack([v[..., 0::2].sin(), v[..., 1::2].cos()], dim=-1).flatten(-2)

    return torch.cat([embed(y), embed(x)], dim=-1)


def grid_positions(h: int, w: int, device: torch.device) -> Tensor:
    """(row, col) of every cell of an H×W grid, row-major → ``[H*W, 2]``."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def sine_position_map(batch: int, h: int, w: int, num_feats: int, device: torch.device) -> Tensor:
    """The encoding of every cell as a map ``[B, 2*num_feats, H, W]`` (mmcv's output layout)."""
    pos = sine_position_encoding(grid_positions(h, w, device), (h, w), num_feats)
    return pos.T.reshape(1, -1, h, w).expand(batch, -1, -1, -1)
