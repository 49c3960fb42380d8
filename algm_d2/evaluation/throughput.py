"""Inference speed: a fixed-input benchmark (``measure_throughput``) and a timer for whole evaluation runs.

Times are wall clock from before each call to the device synchronize after it, every call (the authors' release
times so, and an evaluation loop, which reads each batch's results on the host, pays the same): host work a call
cannot overlap with the GPU's is counted. ``measure_throughput(..., overlapped=True)`` adds a second figure, the GPU
time of back-to-back calls between CUDA events, which hides such host work.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree
from tqdm import tqdm

from .utils import infer_batch_size

logger = logging.getLogger(__name__)

# measure_throughput shows a progress bar from this many timed iterations on, unless told otherwise.
_PROGRESS_MIN_ITERS = 100


def _first_tensor(obj: Any) -> Optional[torch.Tensor]:
    return next((leaf for leaf in pytree.tree_leaves(obj) if isinstance(leaf, torch.Tensor)), None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(fn: Callable[[Any], Any], inputs: Any, *, warmup: int = 10, iters: int = 50,
                       device: Union[str, torch.device, None] = None, batch_size: Optional[int] = None,
                       progress: Optional[bool] = None, grad: bool = False, keep_times: bool = False,
                       overlapped: bool = False, desc: str = "throughput") -> Dict[str, Any]:
    """Time ``fn(inputs)``: ``warmup`` untimed calls, then ``iters`` timed ones, under ``torch.no_grad()`` unless
    ``grad``. The release's protocol is one batch of 32 copies of one image.

    ``device`` defaults to the device of the first tensor in ``inputs``; ``batch_size`` to the first dimension of a
    tensor input or the length of a list. Returns {"device", "batch_size", "iters", "warmup", "images_per_second"
    (batch size / median batch time), "ms_per_batch_mean", "ms_per_batch_median", "ms_per_batch_p90",
    "ms_per_image", "peak_memory_mb" (CUDA: peak allocated during the timed calls; None on CPU)}, and with
    ``keep_times`` "ms_per_batch" (every timed call, in order). With ``overlapped`` on CUDA, ``iters`` more calls
    run back to back between CUDA events: "overlapped_ms_per_batch_median" and "overlapped_images_per_second" (GPU
    time; host work that the queue hides is not counted). ``desc`` labels the progress bar (name the setting).
    """
    if iters <= 0 or warmup < 0:
        raise ValueError(f"measure_throughput: need iters > 0 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if device is None:
        first = _first_tensor(inputs)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    batch_size = infer_batch_size(inputs) if batch_size is None else int(batch_size)
    if batch_size is None or batch_size <= 0:
        raise ValueError(f"measure_throughput: cannot tell the batch size of the inputs ({batch_size}); "
                         f"pass batch_size")
    on_cuda = device.type == "cuda"
    show_progress = iters >= _PROGRESS_MIN_ITERS if progress is None else progress

    with torch.set_grad_enabled(grad):
        for _ in range(warmup):
            fn(inputs)
        _synchronize(device)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        batch_ms: List[float] = []
        for _ in tqdm(range(iters), desc=desc, disable=not show_progress):
            start_s = time.perf_counter()
            fn(inputs)
            _synchronize(device)
            batch_ms.append((time.perf_counter() - start_s) * 1000.0)
        overlapped_ms: List[float] = []
        if overlapped and on_cuda:
            events = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(inputs)
                end.record()
                events.append((start, end))
            torch.cuda.synchronize(device)
            overlapped_ms = [start.elapsed_time(end) for start, end in events]

    times = np.asarray(batch_ms, dtype=np.float64)
    median_ms = float(np.median(times))
    result = {
        "device": str(device),
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "images_per_second": batch_size / (median_ms / 1000.0) if median_ms > 0 else float("inf"),
        "ms_per_batch_mean": float(times.mean()),
        "ms_per_batch_median": median_ms,
        "ms_per_batch_p90": float(np.percentile(times, 90)),
        "ms_per_image": median_ms / batch_size,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None,
    }
    if keep_times:
        result["ms_per_batch"] = [float(t) for t in times]
    if overlapped_ms:
        gpu_ms = float(np.median(overlapped_ms))
        result["overlapped_ms_per_batch_median"] = gpu_ms
        result["overlapped_images_per_second"] = batch_size / (gpu_ms / 1000.0) if gpu_ms > 0 else float("inf")
    logger.info("Throughput on %s, batch %d: %.1f images/s (median %.2f ms per batch)", result["device"], batch_size,
                result["images_per_second"], median_ms)
    return result


class InferenceTimer:
    """Images per second over an evaluation run, leaving out the first ``warmup_batches`` batches (allocator and
    kernel warm-up, like detectron2's ``inference_on_dataset``).

    Wrap the model call of each batch: ``with timer.time_batch(len(batch)): outputs = model(batch)``. Given a CUDA
    ``device``, it is synchronized at both ends, so the time is the batch's real latency. Figures are for this rank.
    """

    def __init__(self, *, warmup_batches: int = 5, device: Union[str, torch.device, None] = None):
        if warmup_batches < 0:
            raise ValueError(f"InferenceTimer: warmup_batches must be >= 0, got {warmup_batches}")
        self.warmup_batches = warmup_batches
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.timed_images = 0
        self.timed_seconds = 0.0
        self.warmup_images = 0

    def _synchronize(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def time_batch(self, num_images: int) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        yield
        self._synchronize()
        elapsed = time.perf_counter() - start
        self.batches += 1
        if self.batches <= self.warmup_batches:
            self.warmup_images += num_images
        else:
            self.timed_images += num_images
            self.timed_seconds += elapsed

    def summary(self) -> Dict[str, Any]:
        """{"images" (timed), "seconds", "images_per_second", "ms_per_image" (None before any timed batch),
        "batches", "warmup_batches", "warmup_images"}."""
        timed = self.timed_images > 0 and self.timed_seconds > 0
        return {
            "images": self.timed_images,
            "seconds": self.timed_seconds,
            "images_per_second": self.timed_images / self.timed_seconds if timed else None,
            "ms_per_image": 1000.0 * self.timed_seconds / self.timed_images if timed else None,
            "batches": self.batches,
            "warmup_batches": min(self.batches, self.warmup_batches),
            "warmup_images": self.warmup_images,
        }
