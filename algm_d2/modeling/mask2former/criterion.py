"""Mask2Former's training loss: Hungarian matching on sampled points, then CE (with a down-weighted "no object"
class), sigmoid BCE and dice on importance-sampled points, on the final and every intermediate prediction.

The formulas and defaults are detectron2 Mask2Former's (``criterion.py``, ``matcher.py``), equal to mmdet's config
in EVA: costs 2·(−p_class) + 5·BCE + 5·dice on 12,544 uniform points per image; losses on 12,544 points of which
75% are the most uncertain (|logit| smallest) of 3× oversampled candidates; normalised by the number of GT masks
(summed over ranks).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

Target = Dict[str, Tensor]  # {"labels": [n] long, "masks": [n, H, W] bool/float}


def semantic_to_instance_targets(sem_seg: Tensor, ignore_value: int) -> Target:
    """One binary mask per class present in ``sem_seg`` ``[H, W]`` (mmseg's ``ToMask``), ignored pixels in none."""
    labels = torch.unique(sem_seg)
    labels = labels[labels != ignore_value]
    return {"labels": labels, "masks": sem_seg[None] == labels[:, None, None]}


def mean_num_masks(targets: List[Target], device: torch.device) -> float:
    """Ground-truth masks per rank (summed over ranks, divided by their number), at least 1: the loss normaliser."""
    count = torch.tensor([float(sum(t["labels"].numel() for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count /= dist.get_world_size()
    return max(float(count), 1.0)


def class_weights_with_no_object(num_classes: int, no_object_weight: float) -> Tensor:
    """``[K + 1]`` cross-entropy weights: 1 for every class, ``no_object_weight`` for the "no object" class."""
    weights = torch.ones(num_classes + 1)
    weights[-1] = no_object_weight
    return weights


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """Bilinear values of ``maps`` ``[N, 1, H, W]`` at ``points`` ``[N, P, 2]`` ((x, y) in [0, 1]) → ``[N, P]``."""
    return F.grid_sample(maps, 2.0 * points[:, :, None] - 1.0, align_corners=False)[:, 0, :, 0]


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE of every prediction ``[Q, P]`` against every target ``[n, P]`` → ``[Q, n]``."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of every prediction ``[Q, P]`` against every target ``[n, P]`` → ``[Q, n]``."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to GT masks per image (scipy ``linear_sum_assignment``)."""

    def __init__(self, *, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544) -> None:
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice, self.num_points = cost_class, cost_mask, cost_dice, num_points

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Any], targets: List[Target]) -> List[Tuple[Tensor, Tensor]]:
        indices = []
        for b, target in enumerate(targets):
            probs = outputs["pred_logits"][b].float().softmax(-1)
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.long)
                indices.append((empty, empty))
                continue
            masks = outputs["pred_masks"][b].float()
            points = torch.rand(1, self.num_points, 2, device=masks.device)
            pred = point_sample(masks[:, None], points.expand(masks.shape[0], -1, -1))
            gt = point_sample(target["masks"][:, None].float(), points.expand(labels.numel(), -1, -1))
            cost = (self.cost_class * -probs[:, labels] + self.cost_mask * pairwise_sigmoid_ce(pred, gt)
                    + self.cost_dice * pairwise_dice(pred, gt))
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices


def uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float) -> Tensor:
    """PointRend's sampling: the ``importance_ratio`` most uncertain of ``oversample_ratio``× random candidates
    (uncertainty −|logit|), the rest uniform → ``[N, num_points, 2]``."""
    n = logits.shape[0]
    candidates = torch.rand(n, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates).abs()
    num_uncertain = int(importance_ratio * num_points)
    index = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, index[..., None].expand(-1, -1, 2))
    uniform = torch.rand(n, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([chosen, uniform], dim=1)


class SetCriterion(nn.Module):
    """Weighted losses ``loss_ce``, ``loss_mask``, ``loss_dice`` (+ ``_{i}`` for each intermediate prediction)."""

    def __init__(self, *, num_classes: int, matcher: HungarianMatcher, no_object_weight: float = 0.1,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        # Not persistent: checkpoints keep exactly the model's weights (EVA's key table).
        self.register_buffer("empty_weight", class_weights_with_no_object(num_classes, no_object_weight),
                             persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "SetCriterion":  # noqa: ANN001 - a CfgNode
        node = cfg.MODEL.MASK_FORMER
        matcher = HungarianMatcher(cost_class=node.CLASS_WEIGHT, cost_mask=node.MASK_WEIGHT,
                                   cost_dice=node.DICE_WEIGHT, num_points=node.TRAIN_NUM_POINTS)
        return cls(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, matcher=matcher,
                   no_object_weight=node.NO_OBJECT_WEIGHT, class_weight=node.CLASS_WEIGHT,
                   mask_weight=node.MASK_WEIGHT, dice_weight=node.DICE_WEIGHT, num_points=node.TRAIN_NUM_POINTS,
                   oversample_ratio=node.OVERSAMPLE_RATIO, importance_sample_ratio=node.IMPORTANCE_SAMPLE_RATIO,
                   deep_supervision=node.DEEP_SUPERVISION)

    def _losses(self, outputs: Dict[str, Any], targets: List[Target], num_masks: float) -> Dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        for b, (rows, cols) in enumerate(indices):
            target_classes[b, rows.to(logits.device)] = targets[b]["labels"][cols.to(logits.device)]
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        pred = torch.cat([outputs["pred_masks"][b, rows] for b, (rows, _) in enumerate(indices)]).float()[:, None]
        if pred.shape[0] == 0:  # no GT mask in the batch: the mask losses are zero (still connected to the graph)
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_ce": loss_ce, "loss_mask": zero, "loss_dice": zero}
        gt = torch.cat([targets[b]["masks"][cols] for b, (_, cols) in enumerate(indices)]).float()[:, None]
        with torch.no_grad():
            points = uncertain_points(pred, self.num_points, self.oversample_ratio, self.importance_sample_ratio)
            labels = point_sample(gt, points)
        point_logits = point_sample(pred, points)
        loss_mask = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none").mean(1).sum() / num_masks
        probs = point_logits.sigmoid()
        dice = 1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)
        return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": dice.sum() / num_masks}

    def forward(self, outputs: Dict[str, Any], targets: List[Target]) -> Dict[str, Tensor]:
        num_masks = mean_num_masks(targets, outputs["pred_logits"].device)
        losses = {k: v * self.weights[k] for k, v in self._losses(outputs, targets, num_masks).items()}
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update({f"{k}_{i}": v * self.weights[k] for k, v in self._losses(aux, targets, num_masks).items()})
        return losses
