"""Small helpers shared by the FLOP counter and the speed benchmarks."""
from __future__ import annotations

from typing import Any, Optional

import torch


def infer_batch_size(inputs: Any) -> Optional[int]:
    """Images in a model input: the first dimension of a tensor, the length of a list (detectron2's list of dicts);
    None when neither applies."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    if isinstance(inputs, (list, tuple)) and len(inputs) > 0:
        return len(inputs)
    return None
