"""Prediction images for TensorBoard: input | ground truth | prediction, side by side."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

Color = Tuple[int, int, int]
IGNORE_COLOR = (0, 0, 0)


def colorize(labels: Tensor, colors: Sequence[Color], ignore_label: int) -> Tensor:
    """uint8 ``[3, H, W]`` picture of a label map ``[H, W]``: class k in ``colors[k]``, ``ignore_label`` (and any
    value without a color) black."""
    palette = torch.tensor([*colors, IGNORE_COLOR], dtype=torch.uint8)
    index = labels.long().clone()
    index[(index < 0) | (index >= len(colors)) | (index == ignore_label)] = len(colors)
    return palette[index].permute(2, 0, 1).contiguous()


def prediction_panel(image: Tensor, prediction: Tensor, label: Tensor, colors: Sequence[Color],
                     ignore_label: int) -> Tensor:
    """uint8 ``[3, H, 3W]``: the input image resized to the label's size, the ground truth and the prediction."""
    height, width = label.shape[-2:]
    picture = image.float()[None]
    if picture.shape[-2:] != (height, width):
        picture = nn.functional.interpolate(picture, size=(height, width), mode="bilinear", align_corners=False)
    picture = picture[0].round().clamp(0, 255).to(torch.uint8)
    return torch.cat([picture, colorize(label, colors, ignore_label), colorize(prediction, colors, ignore_label)], 2)


@torch.no_grad()
def prediction_panels(model: nn.Module, batches: Iterable[List[Dict[str, Any]]], *, num_images: int,
                      colors: Sequence[Color], ignore_label: int) -> List[Tensor]:
    """Panels (:func:`prediction_panel`) of the first ``num_images`` labelled images of ``batches``, the model in
    eval mode (its training mode is restored)."""
    panels: List[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if len(panels) >= num_images:
                break
            items = [item for item in batch if "sem_seg" in item][: num_images - len(panels)]
            if not items:
                continue
            for item, output in zip(items, model(items)):
                prediction = output["sem_seg"].argmax(0).cpu()
                panels.append(prediction_panel(item["image"], prediction, item["sem_seg"], colors, ignore_label))
    finally:
        model.train(was_training)
    return panels
