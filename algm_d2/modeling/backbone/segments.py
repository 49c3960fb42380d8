"""Inference through CUDA graphs: a range of blocks cut into segments at the merges' host syncs.

A merge with a threshold needs one value on the host (how many tokens each image keeps) before the work after it
can be issued. Everything else has static shapes once those sizes are known, so the blocks are cut there: a segment
applies the previous stage's plan at a bucketed length, runs the blocks after it (an MLP half, whole blocks, the
next merging block's attention half) and ends with the next stage's plan, which holds the counts. The host reads
the counts (one sync per stage), picks the next segment's buckets and replays its graph: a forward pass is a few
graph replays and one sync per stage; fixed levels (sizes known on the host) need no sync at all.

Inside a segment, tokens after a thresholded merge are padded to a bucketed length (fixed levels keep their exact
length, the same every batch); ViT blocks that can run packed do so (the
packed layout is built on the GPU, rows bucketed), the others run on the padded batch with a key mask (and RoPE at
the merged positions for EVA-02). Padding slots have size 0, so every stage and the key bias leave them out; the
range's output is trimmed to the real longest image, so callers see the tokens and state the eager path gives.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...merge import ALGMConfig, MergeState
from ...merge.packing import SequenceOffsets
from ...merge.rules import SequenceSizes
from ...merge.stages import StagePlan, apply_stage, plan_stage, stage_changes_tokens
from ...merge.state import attention_dtype
from ..ops.packed_layout import build_layout
from .block_graphs import BlockGraphs, bucket_rows, bucket_seqlen
from .rope import RotaryPhases

if TYPE_CHECKING:
    from .algm_vit import ALGMViT, TokenStream


@dataclass(frozen=True)
class Op:
    """One step of a range: the attention half of block ``index``, a merge ``stage`` after it, or its MLP half."""

    kind: str  # "attention", "stage" or "mlp"
    index: int
    stage: str = ""


def range_ops(algm: ALGMConfig, start: int, end: int) -> Tuple[Op, ...]:
    """Blocks ``start..end-1`` as attention → the stages after it → MLP."""
    ops: List[Op] = []
    for index in range(start, end):
        ops.append(Op("attention", index))
        ops.extend(Op("stage", index, name) for name in algm.stages_at(index + 1))
        ops.append(Op("mlp", index))
    return tuple(ops)


@dataclass
class _Pending:
    """A stage planned at the end of one segment, applied at the start of the next; ``sizes``: its output."""

    op: Op
    plan: StagePlan
    sizes: SequenceSizes


def _plan_tensors(plan: Optional[StagePlan]) -> Tuple[Tensor, ...]:
    if plan is None:
        return ()
    return tuple(getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name != "sizes")


def unpack_rows(rows: Tensor, cu_seqlens: Tensor, num_tokens: Tensor, seq_len: int) -> Tensor:
    """Packed rows → padded ``[B, seq_len, C]`` (zeros on padding) with static shapes: a gather, no host value."""
    position = torch.arange(seq_len, device=rows.device)
    valid = position < num_tokens[:, None]
    index = torch.where(valid, cu_seqlens[:-1, None].long() + position, 0)
    gathered = rows.index_select(0, index.flatten()).view(num_tokens.shape[0], seq_len, rows.shape[-1])
    return gathered * valid[..., None].to(gathered.dtype)


def pad_stream(x: Tensor, state: MergeState, length: int) -> Tuple[Tensor, MergeState]:
    """``x`` and ``state`` padded with empty slots (size 0, ignored by attention and the stages) to ``length``."""
    extra = length - x.shape[1]
    if extra <= 0:
        return x, state
    padded = dataclasses.replace(state, sizes=F.pad(state.sizes, (0, extra)),
                                 positions=F.pad(state.positions, (0, 0, 0, extra)), padded=True)
    return F.pad(x, (0, 0, 0, extra)), padded


class SegmentRunner:
    """Runs blocks of ``vit`` on a :class:`TokenStream` through ``graphs`` (see the module docstring)."""

    def __init__(self, vit: "ALGMViT", graphs: BlockGraphs) -> None:
        self.vit, self.graphs = vit, graphs

    def _packs(self, algm: ALGMConfig, body: Sequence[Op], merged: bool) -> bool:
        return merged and self.vit.packed_attention and all(
            self.vit.block_packs(algm, op.index) for op in body if op.kind == "attention")

    def run(self, stream: "TokenStream", start: int, end: int) -> None:
        """Blocks ``start..end-1`` on ``stream`` in place, as :meth:`ALGMViT.run_blocks` runs them eagerly."""
        ops = range_ops(stream.algm, start, end)
        x, state = stream.x, stream.state
        if stream.grid_rope is not None and stream.phases is None:
            stream.phases = RotaryPhases(stream.grid_rope, state.grid_size)  # checked once, on the host
        if not state.merged:
            sizes = SequenceSizes.uniform(state.seq_len, state.sizes.shape[0])
        else:
            sizes = stream.sizes if stream.sizes is not None else SequenceSizes.of(state.num_tokens)
        counts, pending, changed, begin = state.num_tokens, None, False, 0
        while True:
            stop = next((i for i in range(begin, len(ops)) if ops[i].kind == "stage"), len(ops))
            body, tail = ops[begin:stop], (ops[stop] if stop < len(ops) else None)
            changes = pending is not None and stage_changes_tokens(pending.op.stage, pending.sizes, x.shape[1])
            if changes:
                sizes = pending.sizes
            merged = state.merged or changes
            packs = self._packs(stream.algm, body, merged)
            length = x.shape[1]
            if merged:  # thresholds: lengths change every batch, so bucket them; fixed levels keep theirs
                length = sizes.longest
                if stream.algm.data_dependent:
                    length = bucket_seqlen(length) if packs else bucket_rows(length)
                if pending is None:  # a range that starts on merged tokens: pad them to the bucket
                    x, state = pad_stream(x, state, length)
            if changes:
                counts = pending.plan.num_tokens.clone()  # a graph's output: the next replay overwrites it
            x, state, plan = self._segment(stream, x, state, pending if changes else None, body, tail, length,
                                           packs, sizes)
            changed = changed or changes
            done = tuple(counts for op in body if op.kind == "mlp")  # blocks finished in this segment
            state = dataclasses.replace(state, history=state.history + done)
            if tail is None:
                break
            pending = None if plan is None else _Pending(tail, plan, plan.sizes or SequenceSizes.of(plan.num_tokens))
            begin = stop + 1
        self._finish(stream, x, state, sizes, counts, changed)

    def _segment(self, stream: "TokenStream", x: Tensor, state: MergeState, pending: Optional[_Pending],
                 body: Sequence[Op], tail: Optional[Op], length: int, packs: bool, sizes: SequenceSizes
                 ) -> Tuple[Tensor, MergeState, Optional[StagePlan]]:
        """Apply ``pending`` at ``length``, run ``body``, plan ``tail``: one graph replay (or its eager run)."""
        vit, algm, p = self.vit, stream.algm, self.vit.num_prefix_tokens
        grid, in_padded, in_merged = state.grid_size, state.padded, state.merged
        out_padded = sizes.padded or length != sizes.longest if (pending is not None or in_merged) else in_padded
        rows = bucket_rows(sizes.total, self.graphs.buckets_per_octave) if packs else 0
        phases = stream.phases
        rope_inputs: Tuple[Tensor, ...] = ()
        if stream.grid_rope is not None:
            rope_inputs = (stream.grid_rope,) + ((phases.origin, phases.row_step, phases.col_step) if phases else ())
        plan_in = _plan_tensors(pending.plan) if pending is not None else ()
        plan_type = type(pending.plan) if pending is not None else None
        head = pending.op if pending is not None else None
        head_sizes = pending.sizes if pending is not None else None
        meta: dict = {}
        # a merged state's tensors (MergeState's field order); an unmerged one is the initial layout
        state_inputs = (state.index_map, state.sizes, state.positions, state.num_tokens) if in_merged else ()

        def run(x: Tensor, *extra: Tensor) -> Tuple[object, ...]:
            state_t, extra = extra[:len(state_inputs)], extra[len(state_inputs):]
            rope_in, plan_t = extra[:len(rope_inputs)], extra[len(rope_inputs):]
            if in_merged:
                st = MergeState(grid, p, *state_t, padded=in_padded, merged=True)
            else:  # the unmerged layout is built in the graph: nothing to copy in
                st = MergeState.initial(x.shape[0], grid, p, x.device)
            if head is not None:
                x, st = apply_stage(algm, head.stage, x, st, plan_type(*plan_t), head_sizes, seq_len=length)
            h, offsets, bias, rope = x, None, None, None
            if packs:
                cu_seqlens, pack_index = build_layout(st.num_tokens, length, rows, zero_tail=True)
                h, offsets = x.flatten(0, 1).index_select(0, pack_index), SequenceOffsets(cu_seqlens, length)
            else:
                if st.merged:
                    bias = st.attention_bias(algm.prop_attn, attention_dtype(x))
                if rope_in:
                    rope = rope_in[0]
                    if st.merged:
                        origin, row_step, col_step = rope_in[1:]
                        phase = origin + st.positions[:, p:, :1] * row_step + st.positions[:, p:, 1:] * col_step
                        rope = torch.cat([phase.sin(), phase.cos()], dim=-1)[:, None]
            for op in body:
                if op.kind == "attention":
                    h = (vit._packed_attention_residual(op.index, h, offsets) if packs
                         else vit._attention_residual(op.index, h, bias, rope))
                else:
                    h = vit._mlp_residual(op.index, h)
            x = unpack_rows(h, offsets.cu_seqlens, st.num_tokens, length) if packs else h
            plan = plan_stage(algm, tail.stage, tail.index + 1, x, st) if tail is not None else None
            meta["plan_type"], meta["plan_sizes"] = type(plan) if plan is not None else None, getattr(plan, "sizes", None)
            return (x, st.sizes, st.positions, st.index_map, st.num_tokens, meta.copy()) + _plan_tensors(plan)

        key = ("segment", algm, tuple(body), tail, head, length, rows, packs, in_padded, in_merged, out_padded,
               head_sizes.padded if head_sizes is not None else None, len(rope_inputs))
        inputs = (x,) + state_inputs + rope_inputs + plan_in
        out = self.graphs.segment(key, run, inputs)
        x_out, sizes_t, positions, index_map, num_tokens, info = out[:6]
        plan = None
        if info["plan_type"] is not None:
            plan = info["plan_type"](*out[6:], sizes=info["plan_sizes"])
        merged = in_merged or head is not None
        new_state = MergeState(grid, p, index_map, sizes_t, positions, num_tokens, padded=out_padded, merged=merged,
                               history=state.history, total_tokens=sizes.total)
        return x_out, new_state, plan

    def _finish(self, stream: "TokenStream", x: Tensor, state: MergeState, sizes: SequenceSizes, counts: Tensor,
                changed: bool) -> None:
        """Trim the range's output to the real longest image and copy it out of the graphs' buffers."""
        longest = sizes.longest if state.merged else x.shape[1]
        stream.x = x[:, :longest].clone()
        if state.merged:
            stream.state = dataclasses.replace(
                state, sizes=state.sizes[:, :longest].clone(), positions=state.positions[:, :longest].clone(),
                index_map=state.index_map.clone(), num_tokens=counts, padded=sizes.padded, total_tokens=sizes.total)
            stream.sizes = sizes
        else:  # nothing merged: the stream's own state (not the graphs' copies), with the blocks recorded
            stream.state = dataclasses.replace(stream.state, history=state.history)
        if changed:
            stream.refresh_attention_inputs(stream.x, self.vit.num_prefix_tokens)
