"""CUDA graphs of the backbone's segments: the work between two host syncs of a forward pass (inference).

In eager mode a small ViT on a GPU is bound by the host: a Seg-S block on 32 images runs faster on the GPU than
Python issues its kernels, and a merge adds many small ones. Under thresholds the host also waits at each merge's
sync until the GPU has drained its queue, so every kernel it issues after that is on the critical path. Between two
syncs the work has, for one set of input shapes, a fixed sequence of kernels (:mod:`.segments` cuts the blocks
there and buckets the shapes), so it is captured once and replayed: one launch per segment. Row counts of packed
runs are bucketed by :func:`bucket_rows` (16 buckets per doubling by default: at most 6.25% extra rows that belong
to no image, computed and dropped), the padded length of a merged batch by :func:`bucket_seqlen` (packed runs: it
only sizes the attention grid) or :func:`bucket_rows` (padded runs).

A key is captured the ``capture_after``-th time it is seen (default: the second); before that its segment runs
eagerly on the same static shapes, so shapes that never come back cost no capture. Each captured key owns a graph,
its static inputs and its outputs (each replay overwrites them); all graphs share one memory pool for their
intermediates (they replay one at a time on one stream). At most ``max_graphs`` are kept, least recently used first
out. Capture runs with autocast's weight cache off: a cached cast would be freed when the caller's autocast context
ends, and later replays would read freed memory.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, Tuple

import torch
from torch import Tensor


logger = logging.getLogger(__name__)

# a packed run's longest image is rounded up to this (it sizes the attention grid, whose programs past an image's
# end exit at once: a coarse step costs little and keeps the number of graphs down)
SEQLEN_STEP = 256


def bucket_rows(total: int, per_octave: int = 16) -> int:
    """``total`` rounded up to a multiple of 1/``per_octave`` of its power of two (at least 16 rows): ``per_octave``
    buckets per doubling, at most 1/``per_octave`` extra rows."""
    step = max(16, 1 << max(0, total.bit_length() - per_octave.bit_length()))
    return -(-total // step) * step


def bucket_seqlen(max_seqlen: int) -> int:
    """The longest image rounded up to a multiple of ``SEQLEN_STEP``: the padded length a packed graph is built for."""
    return -(-max_seqlen // SEQLEN_STEP) * SEQLEN_STEP


@dataclass
class _Captured:
    graph: Optional["torch.cuda.CUDAGraph"]
    inputs: Tuple[Tensor, ...]  # static inputs, copied into before each replay
    output: Optional[Tuple[object, ...]]  # written by each replay


def _copy_outputs(static: Tuple[object, ...], fresh: Tuple[object, ...]) -> Tuple[object, ...]:
    """``fresh`` outputs written into the ``static`` ones (tensors in place, as a replay would; others, and expanded
    views that cannot be written in place, replaced)."""
    return tuple(s.copy_(f) if isinstance(s, Tensor) and 0 not in s.stride() else f for s, f in zip(static, fresh))


class BlockGraphs:
    """Captures and replays the segments of :mod:`.segments`, keyed by their static shapes.

    Args:
        max_graphs: graphs kept at once (least recently used are dropped).
        buckets_per_octave: row buckets of packed runs per doubling of the total (a power of two): more buckets pad
            fewer rows but capture more graphs (each new bucket costs an eager warm-up pass and a capture).
        capture: False runs the same static-buffer and bucketing logic without capturing (the CPU tests use it).
        capture_after: sightings of a key before it is captured (1: at once).
    """

    def __init__(self, *, max_graphs: int = 128, buckets_per_octave: int = 16, capture: bool = True,
                 capture_after: int = 2) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if capture_after < 1:
            raise ValueError(f"capture_after must be >= 1, got {capture_after}")
        if buckets_per_octave < 1 or buckets_per_octave & (buckets_per_octave - 1):
            raise ValueError(f"buckets_per_octave (MODEL.BACKBONE.CUDA_GRAPH_BUCKETS) must be a power of two, got "
                             f"{buckets_per_octave}")
        self.max_graphs = max_graphs
        self.buckets_per_octave = buckets_per_octave
        self.capture = capture
        self.capture_after = capture_after
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        # sightings of keys not captured yet (bounded: the oldest are forgotten first)
        self._sightings: "OrderedDict[Hashable, int]" = OrderedDict()
        self._uncapturable: set = set()  # keys whose capture failed: they run eagerly
        self._pool = None
        self.captures = 0  # graphs captured so far (a steady state captures none)
        self.eager_runs = 0  # runs of keys not captured yet
        self.partitioned: Optional[bool] = None  # the owner's parameters are gathered per call (set on first use)

    def usable(self, x: Tensor) -> bool:
        """Whether blocks on ``x`` may replay a graph: CUDA inference without autograd, outside a capture,
        torch.compile or a jit trace (those record the blocks themselves)."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        return not self.capture or (x.is_cuda and not torch.cuda.is_current_stream_capturing())

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._sightings.clear()
        self._uncapturable.clear()

    def segment(self, key: Hashable, run: Callable[..., Tuple[object, ...]], inputs: Sequence[Tensor]
                ) -> Tuple[object, ...]:
        """``run(*inputs)`` (static shapes: the caller buckets them) through the graph of ``key`` and these shapes;
        returns its outputs (tensors valid until the graph's next replay; other values as the capture left them)."""
        return self._replay(("segment", key), run, inputs, [tuple(t.shape) for t in inputs])

    def _replay(self, key: Hashable, run: Callable[..., Tuple[object, ...]], inputs: Sequence[Tensor],
                shapes: Sequence[Tuple[int, ...]]) -> Tuple[object, ...]:
        device = inputs[0].device
        autocast = torch.is_autocast_enabled(device.type)
        key = key + (str(device), tuple(shapes), tuple(t.dtype for t in inputs), autocast,
                     torch.get_autocast_dtype(device.type) if autocast else None, torch.is_inference_mode_enabled())
        entry = self._graphs.get(key)
        fresh = entry is None
        if fresh and (key in self._uncapturable or self._sighted(key) < self.capture_after):
            self.eager_runs += 1
            return run(*self._static_inputs(inputs, shapes))
        if fresh:
            self._sightings.pop(key, None)
            entry = _Captured(None, self._static_inputs(inputs, shapes), None)
        else:
            for static, given in zip(entry.inputs, inputs):
                static[tuple(slice(0, n) for n in given.shape)].copy_(given)
        if not self.capture:
            out = run(*entry.inputs)
            entry.output = out if entry.output is None else _copy_outputs(entry.output, out)
        elif fresh:
            try:
                entry.graph, entry.output = self._capture(run, entry.inputs)
            except RuntimeError as error:  # an op that cannot be captured (e.g. a host sync): run it eagerly
                self._uncapturable.add(key)
                logger.warning("a block segment could not be captured as a CUDA graph; it runs eagerly from now on "
                               "(inputs %s): %s", [tuple(t.shape) for t in inputs], error)
                return run(*entry.inputs)
        if entry.graph is not None:
            entry.graph.replay()
        if fresh:
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return entry.output

    def _sighted(self, key: Hashable) -> int:
        """Count one more sighting of the uncaptured ``key``; returns the count so far."""
        count = self._sightings.pop(key, 0) + 1
        self._sightings[key] = count
        while len(self._sightings) > 4 * self.max_graphs:
            self._sightings.popitem(last=False)
        return count

    @staticmethod
    def _static_inputs(inputs: Sequence[Tensor], shapes: Sequence[Tuple[int, ...]]) -> Tuple[Tensor, ...]:
        """The inputs copied into zero buffers of the static ``shapes`` (a bucket's tail rows stay finite: they are
        computed, never read)."""
        buffers = tuple(torch.zeros(s, dtype=t.dtype, device=t.device) for s, t in zip(shapes, inputs))
        for static, given in zip(buffers, inputs):
            static[tuple(slice(0, n) for n in given.shape)].copy_(given)
        return buffers

    def _capture(self, run: Callable[..., Tuple[object, ...]], inputs: Tuple[Tensor, ...]
                 ) -> Tuple["torch.cuda.CUDAGraph", Tuple[object, ...]]:
        device = inputs[0].device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast, cache_enabled=False):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up (lazy inits, kernel compiles) off the capturing stream
                run(*inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread-local capture: other threads' CUDA calls (a data loader pinning the next batch) are allowed
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = run(*inputs)
        self.captures += 1
        logger.debug("captured block graph %d (%d kept): inputs %s", self.captures, len(self._graphs) + 1,
                     [tuple(t.shape) for t in inputs])
        return graph, output
