"""detectron2's calling convention around a segmentation network: normalize → batch → net → loss / inference.

``model(batched_inputs)`` takes a list of dicts with ``"image"`` (uint8 ``[3, H, W]`` RGB), in training
``"sem_seg"`` (long ``[H, W]``, ignore 255), in inference ``"height"``/``"width"`` (the original size). Training
returns ``{"loss_sem_seg": ...}`` (cross-entropy), or the net's own losses when it has ``losses(images, targets)``;
inference returns ``[{"sem_seg": probabilities [K, height, width]}]``; :meth:`SegmentationModel.predict_labels`
(what the evaluation loop calls) returns ``[{"sem_seg_labels": long [height, width]}]``, their argmax, without the
full-resolution probabilities where one view is enough (fused upsample + argmax). Test-time inference is whole-image
or sliding-window (the release's), optionally multi-scale and flipped.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...merge import ALGMConfig
from ..inputs import check_batched_inputs
from ..ops.upsample_argmax import upsample_argmax
from ..registry import META_ARCH_REGISTRY
from .merging import MergeStats, combined_merge_stats

TEST_MODES = ("whole", "slide")
SMALL_IMAGE_RULES = ("upsample", "pad")


def sliding_window_anchors(size: int, window: int, stride: int) -> List[int]:
    """The release's window starts along one side: every ``stride`` while the window fits, then flush with the end."""
    if size <= window:
        return [0]
    return [a for a in range(0, size, stride) if a < size - window] + [size - window]


class SegmentationModel(nn.Module):
    """The model :func:`~algm_d2.modeling.build_model` returns: the network ``MODEL.META_ARCHITECTURE`` names
    (``net(images [B,3,H,W]) -> logits [B,K,H,W]``: Segmenter, ...) with what training and evaluation need around it
    (normalization, the loss, whole / sliding-window / multi-scale inference).

    Args:
        net: the segmentation network (registered in META_ARCH_REGISTRY).
        pixel_mean, pixel_std: RGB statistics on the 0-255 scale.
        ignore_value: label excluded from the loss.
        test_mode: "whole" or "slide"; crop_size/stride/test_batch_size configure "slide" (crops per forward).
        test_scales: image scale factors at test time (results averaged), test_flip: also run the flipped image.
        softmax_views: softmax every view's scores before averaging, probability-like ones included (EVA).
        small_image: "slide" on an image whose short side is below the crop: "upsample" (Segmenter's release) or
            "pad" with black pixels, removed after sliding (EVA's PadShortSide).
        fused_labels: :meth:`predict_labels` of a single view resizes and takes the argmax in one pass (no
            ``[K, H, W]`` probabilities); False computes them and takes their argmax.
    """

    def __init__(self, *, net: nn.Module, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 ignore_value: int = 255, test_mode: str = "whole", crop_size: int = 512, stride: int = 512,
                 test_batch_size: int = 8, test_scales: Sequence[float] = (1.0,), test_flip: bool = False,
                 softmax_views: bool = False, small_image: str = "upsample", fused_labels: bool = True) -> None:
        super().__init__()
        if test_mode not in TEST_MODES:
            raise ValueError(f"TEST.MODE must be one of {TEST_MODES}, got {test_mode!r}")
        for key, stats in (("MODEL.PIXEL_MEAN", pixel_mean), ("MODEL.PIXEL_STD", pixel_std)):
            if len(stats) != 3:
                raise ValueError(f"{key} must have 3 values (R, G, B), got {list(stats)}")
        if min(pixel_std) <= 0:
            raise ValueError(f"MODEL.PIXEL_STD must be > 0, got {list(pixel_std)}")
        if small_image not in SMALL_IMAGE_RULES:
            raise ValueError(f"TEST.SLIDE_SMALL_IMAGE must be one of {SMALL_IMAGE_RULES}, got {small_image!r}")
        if stride <= 0 or crop_size <= 0 or stride > crop_size:
            raise ValueError(f"TEST.STRIDE ({stride}) must be in 1..TEST.CROP_SIZE ({crop_size})")
        self.net = net
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.ignore_value = ignore_value
        self.test_mode = test_mode
        self.crop_size = crop_size
        self.stride = stride
        self.test_batch_size = test_batch_size
        self.test_scales = tuple(test_scales)
        self.test_flip = test_flip
        self.softmax_views = softmax_views
        self.small_image = small_image
        self.fused_labels = fused_labels
        self._forward_stats: List[MergeStats] = []

    @classmethod
    def from_config(cls, cfg) -> "SegmentationModel":  # noqa: ANN001 - a CfgNode
        net = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE).from_config(cfg)
        return cls(net=net, **cls.config_kwargs(cfg),
                   test_scales=cfg.TEST.SCALES, test_flip=cfg.TEST.FLIP, fused_labels=cfg.TEST.FUSED_LABELS)

    @staticmethod
    def config_kwargs(cfg) -> Dict[str, Any]:  # noqa: ANN001 - a CfgNode
        """The constructor arguments of one view's inference that the config gives: normalization, ignore label,
        whole / sliding-window inference and EVA's view rules (test-time scales and flips are the caller's)."""
        return {"pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE, "test_mode": cfg.TEST.MODE,
                "crop_size": cfg.TEST.CROP_SIZE, "stride": cfg.TEST.STRIDE, "test_batch_size": cfg.TEST.BATCH_SIZE,
                "softmax_views": cfg.TEST.SOFTMAX_VIEWS, "small_image": cfg.TEST.SLIDE_SMALL_IMAGE}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _normalize(self, image: Tensor) -> Tensor:
        """uint8 RGB → normalized, in the dtype of the model's weights (bf16 under DeepSpeed's bf16 mode)."""
        image = image.to(self.device, non_blocking=True).float()
        dtype = next(self.net.parameters()).dtype
        return ((image - self.pixel_mean.float()) / self.pixel_std.float()).to(dtype)

    def forward(self, batched_inputs: List[Dict[str, Any]]):  # noqa: ANN201 - dict of losses or list of results
        check_batched_inputs(batched_inputs)
        self._forward_stats = []
        if self.training:
            return self.losses(batched_inputs)
        return [{"sem_seg": self.inference(x["image"], (x.get("height"), x.get("width")))} for x in batched_inputs]

    def losses(self, batched_inputs: List[Dict[str, Any]]) -> Dict[str, Tensor]:
        images, targets = [], []
        for x in batched_inputs:
            if "sem_seg" not in x:
                raise ValueError(f"training input {x.get('file_name', '?')} has no 'sem_seg' label")
            images.append(self._normalize(x["image"]))
            targets.append(x["sem_seg"].to(self.device, non_blocking=True))
        height = max(t.shape[-2] for t in targets)
        width = max(t.shape[-1] for t in targets)
        images_t = torch.stack([F.pad(i, (0, width - i.shape[-1], 0, height - i.shape[-2])) for i in images])
        targets_t = torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=self.ignore_value)
                                 for t in targets]).long()
        if hasattr(self.net, "losses"):  # set-prediction networks (Mask2Former) bring their own criterion
            losses = self.net.losses(images_t, targets_t)
            self._record_stats()
            return losses
        logits = self._run(images_t)
        loss = F.cross_entropy(logits.float(), targets_t, ignore_index=self.ignore_value)
        return {"loss_sem_seg": loss}

    def _run(self, images: Tensor) -> Tensor:
        logits = self.net(images)
        self._record_stats()
        return logits

    def _record_stats(self) -> None:
        stats = getattr(self.net, "merge_stats", None)
        if stats:
            self._forward_stats.append(stats)

    @torch.no_grad()
    def inference(self, image: Tensor, output_size: Tuple[Optional[int], Optional[int]]) -> Tensor:
        """Class probabilities ``[K, height, width]`` for one uint8 image, averaged over scales and flips."""
        image = self._normalize(image)
        height = output_size[0] or image.shape[-2]
        width = output_size[1] or image.shape[-1]
        total: Optional[Tensor] = None
        runs = 0
        for scale in self.test_scales:
            scaled = image[None]
            if scale != 1.0:
                size = (max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale)))
                scaled = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True) if self.test_flip else (False,):
                view = scaled.flip(-1) if flip else scaled
                logits = self._slide(view) if self.test_mode == "slide" else self._run(view)
                logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
                probs = (logits.flip(-1) if flip else logits)[0]
                # Mask2Former's scores are already probability-like (softmax(class) × sigmoid(mask)); EVA softmaxes
                # them again per view (TEST.SOFTMAX_VIEWS).
                raw = getattr(self.net, "output_kind", "logits") == "probabilities" and not self.softmax_views
                probs = probs if raw else probs.softmax(0)
                total = probs if total is None else total + probs
                runs += 1
        return total / runs

    @torch.no_grad()
    def predict_labels(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Tensor]]:
        """``[{"sem_seg_labels": long [height, width]}]``: the argmax of what :meth:`forward` returns in inference."""
        self._forward_stats = []
        return [{"sem_seg_labels": self._labels(x["image"], (x.get("height"), x.get("width")))}
                for x in batched_inputs]

    def _labels(self, image: Tensor, output_size: Tuple[Optional[int], Optional[int]]) -> Tensor:
        if not self.fused_labels or len(self.test_scales) != 1 or self.test_flip or self.test_scales[0] != 1.0:
            return self.inference(image, output_size).argmax(0)
        view = self._normalize(image)[None]
        size = (output_size[0] or view.shape[-2], output_size[1] or view.shape[-1])
        if self.test_mode == "whole" and tuple(view.shape[-2:]) == size and hasattr(self.net, "predict_labels"):
            labels = self.net.predict_labels(view)  # fused at the network's own output resolution
            self._record_stats()
            return labels[0]
        logits = self._slide(view) if self.test_mode == "slide" else self._run(view)
        return upsample_argmax(logits.float(), size)[0]

    def _slide(self, image: Tensor) -> Tensor:
        """The release's sliding window: short side brought up to the crop (or padded, ``small_image``), overlapping
        crop logits averaged."""
        height, width = image.shape[-2:]
        crop = self.crop_size
        if min(height, width) < crop and self.small_image == "pad":
            black = ((0.0 - self.pixel_mean) / self.pixel_std).to(image.dtype)  # pixel value 0, normalized
            padded = black.expand(1, -1, max(height, crop), max(width, crop)).clone()
            padded[..., :height, :width] = image
            return self._slide(padded)[..., :height, :width]
        if min(height, width) < crop:
            ratio = crop / min(height, width)
            size = (max(crop, int(height * ratio)), max(crop, int(width * ratio)))
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        h, w = image.shape[-2:]
        anchors = [(y, x) for y in sliding_window_anchors(h, crop, self.stride)
                   for x in sliding_window_anchors(w, crop, self.stride)]
        crops = torch.cat([image[..., y:y + crop, x:x + crop] for y, x in anchors])
        logits = torch.cat([self._run(crops[i:i + self.test_batch_size])
                            for i in range(0, len(anchors), self.test_batch_size)])
        total = logits.new_zeros(1, logits.shape[1], h, w)
        count = logits.new_zeros(1, 1, h, w)
        for (y, x), crop_logits in zip(anchors, logits):
            total[..., y:y + crop, x:x + crop] += crop_logits
            count[..., y:y + crop, x:x + crop] += 1
        return total / count

    @property
    def algm(self) -> ALGMConfig:
        """The network's merging (its backbone's ``ALGMConfig``)."""
        return self.net.algm

    @property
    def merge_stats(self) -> MergeStats:
        """Token counts of every network forward of the last call, concatenated over crops/images
        (:class:`MergeStats`; one int per crop)."""
        return combined_merge_stats(self._forward_stats)
