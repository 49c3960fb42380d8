"""CUDA graphs of the backbone's runs of blocks between merges (inference).

In eager mode a small ViT on a GPU is bound by the host: an H100 runs a Seg-S block on 32 images faster than Python
issues its ~15 kernels. Under thresholds the host also waits at each merge's sync until the GPU has drained its
queue, and every kernel it issues after that is on the critical path. The MLP half of a merging block and the blocks
without a merge after it have no host sync and, for one input shape, a fixed sequence of kernels, so they are
captured once and replayed: one launch for the run. Token counts vary from batch to batch, so

- packed runs (a per-image batch) are bucketed: the total is rounded up to 1/16 of its power of two (by default:
  ≤ 6.25% extra rows, 16 buckets per doubling) and the longest image to a multiple of 256 (it only sizes the
  attention grid and the padded input). The rows past the real total belong to no image: attention never reads them and every other op
  works row by row, so they are computed and dropped. After a merge the graph also builds the packed layout and packs
  the padded batch, so the host issues neither.
- dense runs (every image with the same count: the plain model, fixed levels, batch-level policies) are keyed by
  their exact shapes.

A key is captured the ``capture_after``-th time it is seen (default: the second); before that its run is eager
(on the same bucketed static shapes), so shapes that never come back (a batch-level token count in an evaluation of
ever new images) cost no capture. Each captured key owns a graph, its static inputs and its output (each replay
overwrites it); all graphs share one memory pool for their intermediates (they replay one at a time on one stream).
At most ``max_graphs`` are kept, least recently used first out. Capture runs with autocast's weight cache off: a cached cast would be freed when the
caller's autocast context ends, and later replays would read freed memory.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...merge.packing import SequenceOffsets
from ..ops.packed_layout import build_layout

logger = logging.getLogger(__name__)

# the longest image is rounded up to this for the attention grid (the Triton kernel's query block is 64; programs
# past an image's end exit at once, so a coarse step costs little and keeps the number of graphs down)
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
    output: Optional[Tensor]  # written by each replay


class BlockGraphs:
    """Captures and replays runs of blocks, keyed by their static shapes.

    Args:
        max_graphs: graphs kept at once (least recently used are dropped).
        buckets_per_octave: row buckets of packed runs per doubling of the total (a power of two): more buckets pad
            fewer rows but capture more graphs. Each new bucket costs an eager warm-up pass of the run and a capture,
            so the default suits evaluations of a few thousand images: 63 random batches of 32 of the benchmark's
            8 photos (Seg-S, τ 0.88) needed 15 graphs with 16 buckets (2.2% extra rows on average), 45 with 64 (0.5%).
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
        self._pool = None
        self.captures = 0  # graphs captured so far (a steady state captures none)
        self.eager_runs = 0  # runs of keys not captured yet
        self.partitioned: Optional[bool] = None  # the owner's parameters are gathered per call (set on first use)

    def usable(self, x: Tensor) -> bool:
        """Whether a run of blocks on ``x`` may replay a graph: CUDA inference without autograd, outside a capture,
        torch.compile or a jit trace (those record the blocks themselves)."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        return not self.capture or (x.is_cuda and not torch.cuda.is_current_stream_capturing())

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._sightings.clear()

    def packed(self, key: Hashable, run: Callable[[Tensor, SequenceOffsets], Tensor], x: Tensor,
               offsets: SequenceOffsets) -> Tensor:
        """``run(x, offsets)`` on packed rows ``x`` ``[total, C]`` through the graph of the bucket of (total, longest
        image); returns ``[total, C]``, a view of the graph's output (valid until its next replay)."""
        total = x.shape[0]
        rows, seq_len = bucket_rows(total, self.buckets_per_octave), bucket_seqlen(offsets.max_seqlen)

        def static_run(x_static: Tensor, cu_static: Tensor) -> Tensor:
            return run(x_static, SequenceOffsets(cu_static, seq_len))

        inputs = (x, offsets.cu_seqlens)
        shapes = ((rows,) + tuple(x.shape[1:]), tuple(offsets.cu_seqlens.shape))
        return self._replay(("packed", key, seq_len), static_run, inputs, shapes)[:total]

    def packed_from_padded(self, key: Hashable, run: Callable[[Tensor, SequenceOffsets], Tensor], x: Tensor,
                           counts: Tensor, total: int) -> Tensor:
        """Pack the padded batch ``x`` ``[B, T, C]`` (image b: ``counts[b]`` valid tokens first, ``total`` in all)
        and apply ``run(packed, offsets)``, all in the graph of the bucket of (total, T): the packed layout is built
        on the GPU, so the host issues no layout kernels. Returns ``[total, C]`` (valid until the next replay)."""
        batch, seq_len, channels = x.shape
        rows, padded_len = bucket_rows(total, self.buckets_per_octave), bucket_seqlen(seq_len)

        def static_run(x_static: Tensor, counts_static: Tensor) -> Tensor:
            cu_seqlens, pack_index = build_layout(counts_static, padded_len, rows, zero_tail=True)
            return run(x_static.flatten(0, 1).index_select(0, pack_index), SequenceOffsets(cu_seqlens, padded_len))

        shapes = ((batch, padded_len, channels), tuple(counts.shape))
        return self._replay(("packed_from_padded", key, rows), static_run, (x, counts), shapes)[:total]

    def dense(self, key: Hashable, run: Callable[..., Tensor], x: Tensor, *extras: Optional[Tensor]) -> Tensor:
        """``run(x, *extras)`` (``None`` extras stay None) through the graph of these exact shapes; returns the
        graph's output (valid until its next replay)."""
        present = [i for i, t in enumerate(extras) if t is not None]

        def static_run(x_static: Tensor, *given: Tensor) -> Tensor:
            full = [None] * len(extras)
            for i, t in zip(present, given):
                full[i] = t
            return run(x_static, *full)

        inputs = (x,) + tuple(extras[i] for i in present)
        return self._replay(("dense", key, tuple(present)), static_run, inputs, [tuple(t.shape) for t in inputs])

    def _replay(self, key: Hashable, run: Callable[..., Tensor], inputs: Sequence[Tensor],
                shapes: Sequence[Tuple[int, ...]]) -> Tensor:
        device = inputs[0].device
        autocast = torch.is_autocast_enabled(device.type)
        key = key + (str(device), tuple(shapes), tuple(t.dtype for t in inputs), autocast,
                     torch.get_autocast_dtype(device.type) if autocast else None, torch.is_inference_mode_enabled())
        entry = self._graphs.get(key)
        fresh = entry is None
        if fresh and self._sighted(key) < self.capture_after:
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
            entry.output = out if entry.output is None else entry.output.copy_(out)
        elif fresh:
            entry.graph, entry.output = self._capture(run, entry.inputs)
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

    def _capture(self, run: Callable[..., Tensor], inputs: Tuple[Tensor, ...]
                 ) -> Tuple["torch.cuda.CUDAGraph", Tensor]:
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
