"""The process's random generators (Python, NumPy, torch CPU and CUDA) as a checkpointable state."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Dict, Iterator

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """All generator states, as tensors/tuples/ints only (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a side job (evaluation) without moving the training run's generators, so a run that evaluates and a
    resumed run that does not stay identical."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
