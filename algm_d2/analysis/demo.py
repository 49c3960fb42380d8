"""Running a model on the user's own images (tools/demo.py, tools/visualize_merging.py): inputs, segmentation,
merge panels."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import SemSegDatasetMapper, build_test_loader, read_image
from ..modeling import SegmentationModel
from .visualize import input_multiple, merge_groups, states_after_merges

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
STAGE_TITLES = {"clap": "CLAP", "local_gbm": "GBM", "gbm": "GBM", "tome": "ToMe"}


def image_files(inputs: Sequence[str]) -> List[Path]:
    """Files and the images directly inside folders (sorted), each once; a missing path raises naming it."""
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    if not files:
        raise ValueError(f"--input {list(inputs)}: no images found (suffixes {IMAGE_SUFFIXES})")
    return list(dict.fromkeys(files))


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def input_images(cfg, inputs: Sequence[str], *, dataset: str = "", num_images: int = 4  # noqa: ANN001
                 ) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(output name, mapped test input: ``image`` uint8 ``[3, h, w]`` resized as the test set is, ``height``,
    ``width`` of the original) for each file in ``inputs``, or the first ``num_images`` of ``dataset``."""
    if inputs:
        mapper = SemSegDatasetMapper.from_config(cfg, is_train=False)
        for path in image_files(inputs):
            yield safe_name(path.stem), mapper({"file_name": str(path)})
        return
    name = dataset or cfg.DATASETS.TEST[0]
    count = 0
    for batch in build_test_loader(cfg, name, rank=0, world_size=1, num_workers=0):
        for item in batch:
            if count == num_images:
                return
            yield safe_name(str(item.get("image_id", f"{count:04d}"))), item
            count += 1


def merge_panels(model: SegmentationModel, item: Dict[str, Any]
                 ) -> Tuple[np.ndarray, Tuple[int, int], Dict[str, List[List[int]]]]:
    """(the model's input image padded to the patch grid ``[H, W, 3]`` uint8, the grid, {panel title: merged
    groups of grid cells after that layer}) — cumulative: a panel shows every group formed up to its layer."""
    states = states_after_merges(model, item["image"])
    patch, multiple = model.net.backbone.patch_size[0], input_multiple(model)
    image = item["image"]
    pad_h, pad_w = (-image.shape[1]) % multiple, (-image.shape[2]) % multiple
    picture = F.pad(image, (0, pad_w, 0, pad_h)).permute(1, 2, 0).cpu().numpy()
    grid = (picture.shape[0] // patch, picture.shape[1] // patch)
    config = model.net.algm
    panels = {f"after layer {layer} ({' + '.join(STAGE_TITLES[s] for s in config.stages_at(layer))})":
              merge_groups(state) for layer, state in states.items()}
    return picture, grid, panels


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def segment(model: SegmentationModel, item: Dict[str, Any]) -> Tuple[np.ndarray, float, Dict[str, Any]]:
    """(class ids ``[height, width]`` at the original size, seconds of the forward with a synchronize after it,
    the model's merge statistics of that forward)."""
    synchronize(model.device)
    start = time.perf_counter()
    probabilities: Tensor = model([item])[0]["sem_seg"]
    labels = probabilities.argmax(0)
    synchronize(model.device)
    seconds = time.perf_counter() - start
    return labels.cpu().numpy(), seconds, model.merge_stats


def original_image(item: Dict[str, Any]) -> np.ndarray:
    """The image as read from disk ``[H, W, 3]`` uint8 (the mapped input is resized)."""
    return read_image(str(item["file_name"]))


def kept_tokens(stats: Dict[str, Any]) -> Tuple[float, int]:
    """(mean patch tokens leaving the last block over the forward's crops, patch tokens entering block 1)."""
    prefix, initial = stats["num_prefix"], stats["initial_tokens"]
    last = stats["tokens_per_layer"][-1] if stats["tokens_per_layer"] else [initial]
    return float(np.mean(last)) - prefix, initial - prefix
