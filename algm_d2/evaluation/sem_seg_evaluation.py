"""Semantic segmentation metrics with detectron2's definitions (mIoU, fwIoU, mACC, pACC, per-class IoU/ACC).

The confusion matrix is (K+1)x(K+1) with rows = prediction and columns = ground truth; the extra column K takes the
ignored pixels, so predictions on them never count. Classes absent from the ground truth of the whole evaluation
have IoU and ACC = nan and are left out of the means, exactly as detectron2's ``SemSegEvaluator`` does.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .reporting import save_json

logger = logging.getLogger(__name__)

RESULTS_FILE_NAME = "sem_seg_evaluation.json"


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class SemSegEvaluator:
    """Accumulates a confusion matrix over ``process`` calls; ``evaluate`` reduces it over ranks and scores it.

    Call ``reset()``, then ``process(inputs, outputs)`` per batch, then ``evaluate()`` on every rank (it holds a
    collective). Every rank gets the results; only rank 0 writes ``output_dir/sem_seg_evaluation.json``.
    """

    def __init__(self, *, class_names: Sequence[str], ignore_label: int = 255, output_dir: Optional[str] = None):
        if len(class_names) == 0:
            raise ValueError("SemSegEvaluator: class_names is empty")
        self.class_names: List[str] = [str(name) for name in class_names]
        self.num_classes = len(self.class_names)
        self.ignore_label = int(ignore_label)
        if 0 <= self.ignore_label < self.num_classes:
            raise ValueError(f"SemSegEvaluator: ignore_label {self.ignore_label} is a class id "
                             f"(there are {self.num_classes} classes)")
        self.output_dir = output_dir
        self._conf_matrix: Optional[torch.Tensor] = None
        self.reset()

    @classmethod
    def from_config(cls, cfg: Any, *, class_names: Sequence[str],
                    output_dir: Optional[str] = None) -> "SemSegEvaluator":
        """Ignore label from MODEL.SEM_SEG_HEAD.IGNORE_VALUE; class names come from the dataset's metadata."""
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if len(class_names) != num_classes:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes} but the dataset names "
                             f"{len(class_names)} classes")
        return cls(class_names=class_names, ignore_label=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, output_dir=output_dir)

    def reset(self) -> None:
        self._conf_matrix = None

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """This rank's (K+1)x(K+1) int64 counts, rows = prediction, columns = ground truth (K = ignored)."""
        if self._conf_matrix is None:
            size = self.num_classes + 1
            return torch.zeros(size, size, dtype=torch.int64)
        return self._conf_matrix

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """inputs: dicts with "sem_seg" (long [H, W] ground truth) and "file_name"; outputs: dicts with "sem_seg"
        (float [K, H, W] scores at the original resolution) or "sem_seg_labels" (integer [H, W], their argmax)."""
        if len(inputs) != len(outputs):
            raise ValueError(f"SemSegEvaluator.process: {len(inputs)} inputs but {len(outputs)} outputs")
        size = self.num_classes + 1
        for sample, output in zip(inputs, outputs):
            file_name = sample.get("file_name", "<no file_name>")
            if "sem_seg_labels" in output:
                pred = output["sem_seg_labels"]
                if pred.dim() != 2 or pred.is_floating_point():
                    raise ValueError(f"{file_name}: prediction \"sem_seg_labels\" must be integer [H, W], got "
                                     f"{pred.dtype} {tuple(pred.shape)}")
                pred = pred.long()
            else:
                scores = output["sem_seg"]
                if scores.dim() != 3 or scores.shape[0] != self.num_classes:
                    raise ValueError(f"{file_name}: prediction \"sem_seg\" must be [K={self.num_classes}, H, W], "
                                     f"got {tuple(scores.shape)}")
                pred = scores.argmax(dim=0)
            gt = torch.as_tensor(sample["sem_seg"]).to(device=pred.device, dtype=torch.long)
            if gt.shape != pred.shape:
                raise ValueError(f"{file_name}: ground truth is {tuple(gt.shape)} but the prediction is "
                                 f"{tuple(pred.shape)}")
            ignored = gt == self.ignore_label
            invalid = ~ignored & ((gt < 0) | (gt >= self.num_classes))
            if bool(invalid.any()):
                bad = sorted(torch.unique(gt[invalid]).tolist())
                raise ValueError(f"{file_name}: ground-truth labels {bad[:10]} are outside [0, {self.num_classes}) "
                                 f"and are not the ignore label {self.ignore_label}")
            gt = gt.masked_fill(ignored, self.num_classes)
            counts = torch.bincount((size * pred + gt).flatten(), minlength=size * size).view(size, size)
            if self._conf_matrix is None:
                self._conf_matrix = counts
            else:
                self._conf_matrix += counts.to(self._conf_matrix.device)

    def _reduced_confusion_matrix(self) -> np.ndarray:
        conf = self.confusion_matrix
        if _is_distributed():
            # NCCL reduces CUDA tensors only; gloo takes the tensor where it is.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else conf.device
            conf = conf.to(device).clone()
            dist.all_reduce(conf, op=dist.ReduceOp.SUM)
        return conf.cpu().numpy().astype(np.int64)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """{"sem_seg": {"mIoU", "fwIoU", "IoU-<class>"..., "mACC", "pACC", "ACC-<class>"...}} in percent."""
        conf = self._reduced_confusion_matrix()
        scores = _scores_from_confusion(conf, self.class_names)
        results: Dict[str, Dict[str, float]] = OrderedDict(sem_seg=scores)
        if self.output_dir and _is_main_process():
            path = os.path.join(self.output_dir, RESULTS_FILE_NAME)
            save_json(path, results)
            logger.info("Semantic segmentation results written to %s", path)
        logger.info("Semantic segmentation: mIoU %.2f, fwIoU %.2f, mACC %.2f, pACC %.2f",
                    scores["mIoU"], scores["fwIoU"], scores["mACC"], scores["pACC"])
        return results


def _scores_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> Dict[str, float]:
    """detectron2's formulas on a (K+1)x(K+1) matrix (rows prediction, columns ground truth, index K ignored)."""
    num_classes = len(class_names)
    tp = conf.diagonal()[:-1].astype(np.float64)
    pos_gt = conf[:-1, :-1].sum(axis=0).astype(np.float64)
    pos_pred = conf[:-1, :-1].sum(axis=1).astype(np.float64)
    if pos_gt.sum() == 0:
        logger.warning("SemSegEvaluator: no labelled pixel was evaluated; every metric is nan")
    acc = np.full(num_classes, np.nan)
    iou = np.full(num_classes, np.nan)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    with np.errstate(divide="ignore", invalid="ignore"):
        class_weights = pos_gt / pos_gt.sum()
        macc = acc[acc_valid].sum() / acc_valid.sum()
        miou = iou[iou_valid].sum() / iou_valid.sum()
        fwiou = (iou[iou_valid] * class_weights[iou_valid]).sum()
        pacc = tp.sum() / pos_gt.sum()
    scores: Dict[str, float] = OrderedDict()
    scores["mIoU"] = float(100 * miou)
    scores["fwIoU"] = float(100 * fwiou)
    for name, value in zip(class_names, iou):
        scores[f"IoU-{name}"] = float(100 * value)
    scores["mACC"] = float(100 * macc)
    scores["pACC"] = float(100 * pacc)
    for name, value in zip(class_names, acc):
        scores[f"ACC-{name}"] = float(100 * value)
    return scores
