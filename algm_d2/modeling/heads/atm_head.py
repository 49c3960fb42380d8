"""SegViT's Attention-to-Mask decoder (Zhang et al., NeurIPS 2022) on merged tokens, and its loss.

One class query per class. For each tapped encoder layer (deepest first) the queries run through a small
post-norm transformer decoder whose cross-attention reads that layer's (projected, normalised) tokens; the
head-averaged pre-softmax attention logits of its last layer are the per-token mask logits, summed over the layers.

With ALGM the decoder attends to the merged tokens with the key bias log(size) (a merged token weighs as its
members would; the decoder's design, whatever the encoder's ``prop_attn``), and only the per-token masks are
unmerged to the patch grid (one gather per layer) after the decoder: for tokens that equal their members this is
exactly the attention to the unmerged grid.

Module names are the release's (zbwxp/SegVit ``ATMHead``: ``input_proj_i``, ``proj_norm_i``,
``decoder_i.layers.j.{self_attn, multihead_attn.{q,k,v,proj}, linear1, linear2, norm1..3}``, ``q``,
``class_embed``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...merge.state import attention_dtype
from ..backbone.taps import Tap
from ..merged_tokens import patch_key_bias
from ..mask2former.criterion import Target, class_weights_with_no_object, mean_num_masks
from ..registry import SEM_SEG_HEAD_REGISTRY


class ATMCrossAttention(nn.Module):
    """Multi-head cross-attention that also returns its head-averaged, pre-softmax logits ``[B, Q, N]``."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, memory: Tensor, key_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``queries`` ``[B, Q, C]``, ``memory`` ``[B, N, C]``, ``key_bias`` ``[B, 1, 1, N]`` or None."""
        b, nq, c = queries.shape

        def heads(x: Tensor) -> Tensor:
            return x.reshape(b, x.shape[1], self.num_heads, c // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q(queries)), heads(self.k(memory)), heads(self.v(memory))
        logits = (q @ k.transpose(-2, -1)) * self.scale
        weights = (logits if key_bias is None else logits + key_bias).softmax(dim=-1)
        out = (self.attn_drop(weights) @ v).transpose(1, 2).reshape(b, nq, c)
        return self.proj(out), logits.mean(dim=1)


class ATMDecoderLayer(nn.Module):
    """torch's post-norm ``TransformerDecoderLayer`` (ReLU, FFN 4×) with :class:`ATMCrossAttention`."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        # sequence-first as the release (and outside torch's fused inference path, which FLOP counters cannot see)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.multihead_attn = ATMCrossAttention(dim, num_heads, attn_drop=dropout)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout, self.dropout1 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, queries: Tensor, memory: Tensor, key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        seq = queries.transpose(0, 1)
        x = self.norm1(queries + self.dropout1(self.self_attn(seq, seq, seq, need_weights=False)[0].transpose(0, 1)))
        attended, logits = self.multihead_attn(x, memory, key_bias)
        x = self.norm2(x + self.dropout2(attended))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x, logits


class ATMDecoder(nn.Module):
    """``num_layers`` decoder layers; the mask logits are the last layer's (the release's ``TPN_Decoder``)."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ATMDecoderLayer(dim, num_heads, dropout) for _ in range(num_layers)])

    def forward(self, queries: Tensor, memory: Tensor, key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        logits = None
        for layer in self.layers:
            queries, logits = layer(queries, memory, key_bias)
        return queries, logits


@SEM_SEG_HEAD_REGISTRY.register()
class ATMHead(nn.Module):
    """Class queries → one ATM decoder per tapped layer (deepest first) → class logits and cumulative masks.

    Returns ``{"pred_logits" [B, K, K+1], "pred_masks" [B, K, h, w], "aux_outputs": [...]}`` (patch-grid masks;
    the earlier decoders' predictions are the deep supervision).
    """

    def __init__(self, *, in_channels: int, num_classes: int, embed_dim: int = 512, num_heads: int = 16,
                 num_layers: int = 3, num_stages: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MODEL.SEGVIT.EMBED_DIM {embed_dim} is not divisible by NUM_HEADS {num_heads}")
        self.num_stages = num_stages
        for i in range(1, num_stages + 1):
            self.add_module(f"input_proj_{i}", nn.Linear(in_channels, embed_dim))
            self.add_module(f"proj_norm_{i}", nn.LayerNorm(embed_dim))
            self.add_module(f"decoder_{i}", ATMDecoder(embed_dim, num_heads, num_layers, dropout))
        self.q = nn.Embedding(num_classes, embed_dim)
        self.class_embed = nn.Linear(embed_dim, num_classes + 1)
        self._init_weights()

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> "ATMHead":  # noqa: ANN001 - a CfgNode
        node = cfg.MODEL.SEGVIT
        return cls(in_channels=in_channels, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, embed_dim=node.EMBED_DIM,
                   num_heads=node.NUM_HEADS, num_layers=node.NUM_LAYERS, num_stages=len(node.OUT_INDICES),
                   dropout=node.DROPOUT)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The release's init: truncated-normal(0.02) linears with zero bias, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, taps: Sequence[Tap]) -> Dict[str, Any]:
        """The tapped layers, shallowest first (as the encoder produced them) → predictions on the patch grid."""
        if len(taps) != self.num_stages:
            raise ValueError(f"ATMHead has {self.num_stages} decoders, got {len(taps)} layers")
        b = taps[0].tokens.shape[0]
        queries = self.q.weight[None].expand(b, -1, -1)
        logits, masks = [], []
        for i, tap in enumerate(reversed(taps), start=1):
            memory = getattr(self, f"proj_norm_{i}")(getattr(self, f"input_proj_{i}")(tap.patches))
            bias = patch_key_bias(tap.state, True, attention_dtype(memory)) if tap.state.merged else None
            queries, token_masks = getattr(self, f"decoder_{i}")(queries, memory, bias)
            grid = tap.grid(token_masks.transpose(1, 2))  # per-token masks unmerged after the decoder
            masks.append(grid if not masks else masks[-1] + grid)
            logits.append(self.class_embed(queries))
        return {"pred_logits": logits[-1], "pred_masks": masks[-1],
                "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(logits[:-1], masks[:-1])]}


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_masks: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """RetinaNet's focal loss per pixel, averaged per mask, summed over masks / ``num_masks`` (the release's)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """1 − (2·Σ p·t + 1) / (Σ p + Σ t + 1) per mask, summed / ``num_masks``."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class ATMLoss(nn.Module):
    """The release's ATM loss: query k predicts class k, so there is no matching. CE over every query (target k if
    class k is present, else "no object", weighted ``no_object_weight``), focal and dice losses of the present
    classes' masks bilinearly resized to the labels; the same on every earlier decoder's prediction (``_i``)."""

    def __init__(self, *, num_classes: int, no_object_weight: float = 0.1, class_weight: float = 1.0,
                 mask_weight: float = 20.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        # non-persistent: checkpoints keep the release's keys without the criterion
        self.register_buffer("empty_weight", class_weights_with_no_object(num_classes, no_object_weight),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "ATMLoss":  # noqa: ANN001 - a CfgNode
        node = cfg.MODEL.SEGVIT
        return cls(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, no_object_weight=node.NO_OBJECT_WEIGHT,
                   class_weight=node.CLASS_WEIGHT, mask_weight=node.MASK_WEIGHT, dice_weight=node.DICE_WEIGHT)

    def _losses(self, outputs: Dict[str, Any], targets: List[Target], num_masks: float) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        for i, t in enumerate(targets):
            classes[i, t["labels"]] = t["labels"]
        loss_ce = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight)
        masks = outputs["pred_masks"]
        predicted = torch.cat([masks[i, t["labels"]] for i, t in enumerate(targets)])
        wanted = torch.cat([t["masks"] for t in targets]).to(torch.float32)
        predicted = F.interpolate(predicted[:, None].float(), size=wanted.shape[-2:], mode="bilinear",
                                  align_corners=False)[:, 0].flatten(1)
        wanted = wanted.flatten(1)
        return {"loss_ce": loss_ce, "loss_mask": sigmoid_focal_loss(predicted, wanted, num_masks),
                "loss_dice": dice_loss(predicted, wanted, num_masks)}

    def forward(self, outputs: Dict[str, Any], targets: List[Target]) -> Dict[str, Tensor]:
        num_masks = mean_num_masks(targets, outputs["pred_logits"].device)
        losses = {k: v * self.weights[k] for k, v in self._losses(outputs, targets, num_masks).items()}
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v * self.weights[k] for k, v in self._losses(aux, targets, num_masks).items()})
        return losses
