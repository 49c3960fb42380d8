"""CUDA graphs of the backbone's merge-free runs of blocks (inference).

In eager mode a small ViT on a GPU is bound by the host: an H100 runs a Seg-S block on 32 images faster than Python
issues its ~15 kernels, and ALGM's per-image batches, with their packed layouts, issue a few more. A run of blocks
without a merge has no host sync and, for one input shape, a fixed sequence of kernels, so it is captured once and
replayed: one launch for the whole run. Thresholds make the token counts vary from batch to batch, so

- packed runs (a per-image batch: ``[total, C]`` + offsets) are bucketed: the total is rounded up to 1/64 of its
  power of two (≤ 1.6% extra rows, 64 buckets per doubling) and the longest image to a multiple of 128 (it only sizes
  the attention grid). The rows past the real total belong to no image: attention never reads them and every other
  op works row by row, so they are computed and dropped.
- dense runs (every image with the same count: the plain model, fixed levels, batch-level policies) are keyed by
  their exact shapes.

Each key owns a graph and its static input, which also receives the output (a replay overwrites it); all graphs
share one memory pool for their intermediates (they replay one at a time on one stream). At most ``max_graphs``
are kept, least recently used first out. Capture runs with autocast's weight cache off: a cached cast would be
freed when the caller's autocast context ends, and later replays would read freed memory.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...merge.packing import SequenceOffsets

logger = logging.getLogger(__name__)

# the longest image is rounded up to this for the attention grid (the Triton kernel's query block is 64)
SEQLEN_STEP = 128


def bucket_rows(total: int) -> int:
    """``total`` rounded up to a multiple of 1/64 of its power of two (at least 16): few buckets, ≤ 1.6% extra rows."""
    step = max(16, 1 << max(0, total.bit_length() - 7))
    return -(-total // step) * step


def bucket_seqlen(max_seqlen: int) -> int:
    return -(-max_seqlen // SEQLEN_STEP) * SEQLEN_STEP


@dataclass
class _Captured:
    graph: Optional["torch.cuda.CUDAGraph"]
    inputs: Tuple[Tensor, ...]  # static inputs; inputs[0] also receives the output


class BlockGraphs:
    """Captures and replays runs of blocks, keyed by their static shapes.

    Args:
        max_graphs: graphs kept at once (least recently used are dropped).
        capture: False runs the same static-buffer and bucketing logic without capturing (the CPU tests use it).
    """

    def __init__(self, *, max_graphs: int = 64, capture: bool = True) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self.capture = capture
        self._graphs: "OrderedDict[Hashable, _Captured]" = OrderedDict()
        self._pool = None
        self.captures = 0  # graphs captured so far (a steady state captures none)

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

    def packed(self, key: Hashable, run: Callable[[Tensor, SequenceOffsets], Tensor], x: Tensor,
               offsets: SequenceOffsets) -> Tensor:
        """``run(x, offsets)`` on packed rows ``x`` ``[total, C]`` through the graph of the bucket of (total, longest
        image); returns ``[total, C]``, a view of the graph's buffer (valid until its next replay)."""
        rows, seq_len = bucket_rows(x.shape[0]), bucket_seqlen(offsets.max_seqlen)

        def static_run(x_static: Tensor, cu_static: Tensor) -> Tensor:
            return run(x_static, SequenceOffsets(cu_static, seq_len))

        shapes = ((rows,) + tuple(x.shape[1:]), tuple(offsets.cu_seqlens.shape))
        out = self._replay(("packed", key, seq_len) + self._signature((x, offsets.cu_seqlens), shapes), static_run,
                           (x, offsets.cu_seqlens), shapes)
        return out[: x.shape[0]]

    def dense(self, key: Hashable, run: Callable[..., Tensor], x: Tensor, *extras: Optional[Tensor]) -> Tensor:
        """``run(x, *extras)`` (``None`` extras stay None) through the graph of these exact shapes; returns a view of
        the graph's buffer (valid until its next replay)."""
        present = [i for i, t in enumerate(extras) if t is not None]

        def static_run(x_static: Tensor, *given: Tensor) -> Tensor:
            full = [None] * len(extras)
            for i, t in zip(present, given):
                full[i] = t
            return run(x_static, *full)

        inputs = (x,) + tuple(extras[i] for i in present)
        shapes = tuple(tuple(t.shape) for t in inputs)
        return self._replay(("dense", key, tuple(present)) + self._signature(inputs, shapes), static_run, inputs,
                            shapes)

    @staticmethod
    def _signature(inputs: Sequence[Tensor], shapes: Sequence[Tuple[int, ...]]) -> Tuple:
        device = inputs[0].device
        autocast = torch.is_autocast_enabled(device.type)
        return (str(device), tuple(shapes), tuple(t.dtype for t in inputs), autocast,
                torch.get_autocast_dtype(device.type) if autocast else None, torch.is_inference_mode_enabled())

    def _replay(self, key: Hashable, run: Callable[..., Tensor], inputs: Sequence[Tensor],
                shapes: Sequence[Tuple[int, ...]]) -> Tensor:
        entry = self._graphs.get(key)
        fresh = entry is None
        if fresh:
            # zeros: a bucket's tail rows stay finite (they are computed, never read)
            entry = _Captured(None, tuple(torch.zeros(s, dtype=t.dtype, device=t.device)
                                          for s, t in zip(shapes, inputs)))
        for static, given in zip(entry.inputs, inputs):
            static[tuple(slice(0, n) for n in given.shape)].copy_(given)
        if not self.capture:
            entry.inputs[0].copy_(run(*entry.inputs))
        elif fresh:
            entry.graph = self._capture(run, entry.inputs)
        if entry.graph is not None:
            entry.graph.replay()
        if fresh:
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return entry.inputs[0]

    def _capture(self, run: Callable[..., Tensor], inputs: Tuple[Tensor, ...]) -> "torch.cuda.CUDAGraph":
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
            with torch.cuda.graph(graph, pool=self._pool):
                inputs[0].copy_(run(*inputs))
        self.captures += 1
        logger.debug("captured block graph %d (%d kept): inputs %s", self.captures, len(self._graphs) + 1,
                     [tuple(t.shape) for t in inputs])
        return graph
