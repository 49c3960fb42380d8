"""What every analysis tool does first: a model from a config (+ weights) and fixed-size labelled batches."""
from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checkpoint import load_model_weights
from ..config import get_cfg
from ..data import build_test_loader
from ..modeling import SegmentationModel, build_model

logger = logging.getLogger(__name__)


def setup_model(config_file: str, opts: Sequence[str] = ()) -> Tuple[object, SegmentationModel]:
    """The config (file + KEY VALUE overrides) and its model in eval mode, MODEL.WEIGHTS loaded when set. A CUDA
    device falls back to the CPU when there is none (logged)."""
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE %s: no CUDA device here, running on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_model_weights(model, cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: the model has random weights")
    return cfg, model


def labelled_batches(cfg, model: SegmentationModel, dataset: str, *, size: Tuple[int, int],  # noqa: ANN001
                     batch_size: int = 4, max_images: Optional[int] = None) -> Iterator[Tuple[Tensor, Tensor]]:
    """Normalized images ``[B, 3, H, W]`` and labels ``[B, H, W]`` of ``dataset``, each resized to ``size``
    (bilinear / nearest): the same grid for every image, as the encoder's analyses need."""
    loader = build_test_loader(cfg, dataset, rank=0, world_size=1, num_workers=0)
    images, labels, seen = [], [], 0
    for batch in loader:
        for item in batch:
            if "sem_seg" not in item:
                raise ValueError(f"{item.get('file_name', '?')} of {dataset} has no label; the analysis needs one")
            image = F.interpolate(item["image"][None].float(), size=size, mode="bilinear", align_corners=False)[0]
            label = F.interpolate(item["sem_seg"][None, None].float(), size=size, mode="nearest")[0, 0].long()
            images.append(model._normalize(image.round().clamp(0, 255)))  # noqa: SLF001 - the model's own normalization
            labels.append(label)
            seen += 1
            if len(images) == batch_size or seen == max_images:
                yield torch.stack(images), torch.stack(labels).to(model.device)
                images, labels = [], []
            if seen == max_images:
                return
    if images:
        yield torch.stack(images), torch.stack(labels).to(model.device)
