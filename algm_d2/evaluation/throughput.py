"""Inference speed: the timing core (``time_calls`` / ``time_interleaved``: any callable on a stream of batches), a
fixed-input benchmark on it (``measure_throughput``) and a timer for whole evaluation runs.

Times are wall clock from before each call to the device synchronize after it, every call (the authors' release
times so, and an evaluation loop, which reads each batch's results on the host, pays the same): host work a call
cannot overlap with the GPU's is counted. ``measure_throughput(..., overlapped=True)`` adds a second figure, the GPU
time of back-to-back calls between CUDA events, which hides such host work.
"""
from __future__ import annotations

import itertools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Union

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


def images_per_second(batch_size: int, ms_per_batch: float) -> float:
    """``batch_size`` images every ``ms_per_batch`` milliseconds, per second (inf for a zero time)."""
    return batch_size / (ms_per_batch / 1000.0) if ms_per_batch > 0 else float("inf")


@dataclass
class CallTimes:
    """Timed calls of one callable. ``rounds``: per round, the wall clock of each timed call from before it to the
    device synchronize after it, in call order; ``overlapped_ms``: GPU time of back-to-back calls between CUDA
    events (first round, CUDA, when asked); ``host_ms``: median time the host takes to issue one call after a
    synchronize (when asked); ``peak_memory_mb``: CUDA peak allocated during the timed calls (None on CPU)."""

    device: str
    batch_size: int
    warmup: int = 0  # untimed calls, all rounds
    rounds: List[List[float]] = field(default_factory=list)
    overlapped_ms: List[float] = field(default_factory=list)
    host_ms: Optional[float] = None
    peak_memory_mb: Optional[float] = None

    @property
    def ms_per_call(self) -> List[float]:
        return [ms for round_ms in self.rounds for ms in round_ms]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.ms_per_call))

    @property
    def images_per_second(self) -> float:
        """The headline: batch size over the median synchronized call."""
        return images_per_second(self.batch_size, self.median_ms)

    @property
    def round_medians(self) -> List[float]:
        return [float(np.median(round_ms)) for round_ms in self.rounds]

    @property
    def overlapped_images_per_second(self) -> Optional[float]:
        if not self.overlapped_ms:
            return None
        return images_per_second(self.batch_size, float(np.median(self.overlapped_ms)))


@dataclass
class TimedCall:
    """One entry of :func:`time_interleaved`: ``fn(batch)`` on ``batches`` — a sequence (each round makes whole
    passes over it, warm-up included, so every batch is timed equally often) or an iterator (each call takes the
    next batch, across rounds: no batch comes back). ``select`` runs, untimed, before each of the entry's turns
    (e.g. switch the model to this entry's setting); ``label`` names the entry in progress bars."""

    fn: Callable[[Any], Any]
    batches: Union[Sequence[Any], Iterator[Any]]
    batch_size: int
    select: Optional[Callable[[], Any]] = None
    label: str = "throughput"


def _whole_passes(calls: int, inputs: int) -> int:
    """``calls`` rounded up to a multiple of ``inputs``."""
    return -(-calls // inputs) * inputs


def _time_turn(call: TimedCall, batches: Iterator[Any], times: CallTimes, *, warmup: int, iters: int,
               device: torch.device, overlapped: bool, host_calls: int, progress: bool) -> None:
    """One entry's turn of a round: ``warmup`` untimed calls, ``iters`` timed ones appended to ``times`` as a new
    round, then (if asked) as many overlapped calls and ``host_calls`` host-timed calls."""
    on_cuda = device.type == "cuda"
    for _ in range(warmup):
        call.fn(next(batches))
    _synchronize(device)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    batch_ms: List[float] = []
    for _ in tqdm(range(iters), desc=call.label, disable=not progress):
        batch = next(batches)
        start_s = time.perf_counter()
        call.fn(batch)
        _synchronize(device)
        batch_ms.append((time.perf_counter() - start_s) * 1000.0)
    if on_cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        times.peak_memory_mb = peak if times.peak_memory_mb is None else max(times.peak_memory_mb, peak)
    times.warmup += warmup
    times.rounds.append(batch_ms)
    if overlapped and on_cuda:
        events = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call.fn(next(batches))
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times.overlapped_ms = [start.elapsed_time(end) for start, end in events]
    if host_calls:
        issue_ms = []
        for _ in range(host_calls):
            _synchronize(device)
            batch = next(batches)
            start_s = time.perf_counter()
            call.fn(batch)
            issue_ms.append((time.perf_counter() - start_s) * 1000.0)
        _synchronize(device)
        times.host_ms = float(np.median(issue_ms))


def time_interleaved(calls: Mapping[Hashable, TimedCall], *, warmup: int, iters: int, rounds: int = 1,
                     device: Union[str, torch.device], overlapped: bool = False, host_calls: int = 0,
                     grad: bool = False, progress: bool = False, call_progress: bool = False
                     ) -> Dict[Hashable, CallTimes]:
    """Time every entry of ``calls`` in ``rounds`` rounds that visit the entries in turn, so slow drifts of the
    machine (clocks, temperature, other tenants) hit all entries alike. ``iters`` timed calls per entry are spread
    over the rounds (``rounds`` capped at ``iters``; ``ceil(iters / rounds)`` per round, rounded up to whole passes
    for a sequence of batches); the first round warms up ``warmup`` calls, later ones ``max(1, warmup // rounds)``.
    In the first round only: ``overlapped`` (CUDA) times as many calls again back to back between CUDA events, and
    ``host_calls`` calls time how long the host takes to issue one. Under ``torch.no_grad()`` unless ``grad``;
    ``progress``: a bar over the rounds naming the entry being timed; ``call_progress``: a bar over each turn's
    calls, labelled by the entry."""
    if iters <= 0 or warmup < 0 or rounds < 1:
        raise ValueError(f"need iters > 0, warmup >= 0 and rounds >= 1, got iters={iters}, warmup={warmup}, "
                         f"rounds={rounds}")
    device = torch.device(device)
    rounds = min(rounds, iters)
    round_iters = -(-iters // rounds)
    results = {key: CallTimes(device=str(device), batch_size=call.batch_size) for key, call in calls.items()}
    streams = {key: call.batches for key, call in calls.items() if not isinstance(call.batches, Sequence)}
    with torch.set_grad_enabled(grad):
        bar = tqdm(range(rounds), desc="rounds", disable=not progress)
        for round_index in bar:
            round_warmup = warmup if round_index == 0 else max(1, warmup // rounds)
            for key, call in calls.items():
                bar.set_postfix_str(f"timing {call.label}")  # the entry this bar's time is spent on
                if call.select is not None:
                    call.select()
                if key in streams:
                    batches, turn_warmup, turn_iters = streams[key], round_warmup, round_iters
                else:  # a fresh pass each round: timed call j of every round runs batch j % len(batches)
                    inputs = len(call.batches)
                    batches = itertools.cycle(call.batches)
                    turn_warmup, turn_iters = _whole_passes(round_warmup, inputs), _whole_passes(round_iters, inputs)
                _time_turn(call, batches, results[key], warmup=turn_warmup, iters=turn_iters, device=device,
                           overlapped=overlapped and round_index == 0, host_calls=host_calls if round_index == 0
                           else 0, progress=call_progress)
    return results


def time_calls(fn: Callable[[Any], Any], batches: Union[Sequence[Any], Iterator[Any]], *, warmup: int, iters: int,
               device: Union[str, torch.device], batch_size: int, rounds: int = 1, overlapped: bool = False,
               host_calls: int = 0, grad: bool = False, progress: bool = False, desc: str = "throughput"
               ) -> CallTimes:
    """:func:`time_interleaved` of one callable ``fn(batch)`` (``progress``: a bar over its calls, ``desc``)."""
    call = TimedCall(fn=fn, batches=batches, batch_size=batch_size, label=desc)
    return time_interleaved({desc: call}, warmup=warmup, iters=iters, rounds=rounds, device=device,
                            overlapped=overlapped, host_calls=host_calls, grad=grad, call_progress=progress)[desc]


def measure_throughput(fn: Callable[[Any], Any], inputs: Any, *, warmup: int = 10, iters: int = 50,
                       device: Union[str, torch.device, None] = None, batch_size: Optional[int] = None,
                       progress: Optional[bool] = None, grad: bool = False, keep_times: bool = False,
                       overlapped: bool = False, desc: str = "throughput") -> Dict[str, Any]:
    """Time ``fn(inputs)``: ``warmup`` untimed calls, then ``iters`` timed ones, under ``torch.no_grad()`` unless
    ``grad`` (:func:`time_calls` on the one input). The release's protocol is one batch of 32 copies of one image.

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
    batch_size = infer_batch_size(inputs) if batch_size is None else int(batch_size)
    if batch_size is None or batch_size <= 0:
        raise ValueError(f"measure_throughput: cannot tell the batch size of the inputs ({batch_size}); "
                         f"pass batch_size")
    show_progress = iters >= _PROGRESS_MIN_ITERS if progress is None else progress
    timed = time_calls(fn, [inputs], warmup=warmup, iters=iters, device=device, batch_size=batch_size,
                       overlapped=overlapped, grad=grad, progress=show_progress, desc=desc)
    times = np.asarray(timed.ms_per_call, dtype=np.float64)
    median_ms = float(np.median(times))
    result = {
        "device": timed.device,
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "images_per_second": images_per_second(batch_size, median_ms),
        "ms_per_batch_mean": float(times.mean()),
        "ms_per_batch_median": median_ms,
        "ms_per_batch_p90": float(np.percentile(times, 90)),
        "ms_per_image": median_ms / batch_size,
        "peak_memory_mb": timed.peak_memory_mb,
    }
    if keep_times:
        result["ms_per_batch"] = [float(t) for t in times]
    if timed.overlapped_ms:
        result["overlapped_ms_per_batch_median"] = float(np.median(timed.overlapped_ms))
        result["overlapped_images_per_second"] = timed.overlapped_images_per_second
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
