"""The merge state carried along the encoder, and the one scatter that applies any merge plan.

A merge plan is ``dest``: for every token of the current sequence, the slot it goes to in the next sequence (an
integer map, many-to-one). Prefix tokens map to themselves; tokens of padding map to a trash slot that is dropped.
Values are size-weighted means of the members, sizes add up, positions are size-weighted means of grid
coordinates, and the grid's index map is composed with ``dest`` — there is no N×N source matrix anywhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor


def attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention runs in for input ``x``: autocast's when it is on (SDPA wants the bias in that dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def row_sums(rows: Tensor, index: Tensor, size: int) -> Tensor:
    """``out[index[i]] += rows[i]`` into ``size`` zero rows, in a fixed order: ``index_put_`` with accumulate sorts the
    indices on CUDA, so the sums are bitwise repeatable (``index_add_``'s and ``scatter_add``'s atomics are not, and a
    near-tie of a later merge score then falls either way from run to run)."""
    return rows.new_zeros(size, *rows.shape[1:]).index_put_((index,), rows, accumulate=True)


@dataclass
class MergeState:
    """Bookkeeping for a batch of merged token sequences ``[B, T, C]`` with ``num_prefix`` leading tokens.

    Attributes:
        grid_size: (H, W) of the patch grid the sequence came from.
        num_prefix: leading tokens (class, register, distillation) that never merge and stay in front.
        index_map: ``[B, H*W]`` long, the sequence slot (prefix included) holding each grid cell, row-major.
        sizes: ``[B, T]`` float, grid cells per slot (1 for prefix tokens, 0 for padding slots).
        positions: ``[B, T, 2]`` float, mean (row, col) of each slot's cells (0 for prefix and padding).
        num_tokens: ``[B]`` long, valid tokens per image (prefix included); the rest of the sequence is padding.
        padded: whether any image keeps fewer tokens than the sequence length (only under ``per_image``).
        merged: whether any merge has been applied (CLAP needs the unmerged grid).
        history: ``num_tokens`` after each block so far (the backbone records each block with
            :meth:`record_layer`); read it through :meth:`tokens_per_layer`.
        total_tokens: sum of ``num_tokens`` as a host int when known (the merge stages learn it with their one host
            sync), else None; packed layouts need it.
        virtual: under the no-reduction ablation (every token kept), the merged layout the stages would have left;
            the sequence itself stays the full grid and this state's own layout stays unmerged. None otherwise.
    """

    grid_size: Tuple[int, int]
    num_prefix: int
    index_map: Tensor
    sizes: Tensor
    positions: Tensor
    num_tokens: Tensor
    padded: bool = False
    merged: bool = False
    history: Tuple[Tensor, ...] = ()
    total_tokens: Optional[int] = None
    virtual: Optional["MergeState"] = None

    @classmethod
    def initial(cls, batch: int, grid_size: Tuple[int, int], num_prefix: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> "MergeState":
        """The state of an unmerged sequence: every grid cell is its own token, in row-major order."""
        h, w = grid_size
        n = h * w
        index_map = torch.arange(num_prefix, num_prefix + n, device=device).expand(batch, n)
        sizes = torch.ones(batch, num_prefix + n, device=device, dtype=dtype)
        rows = torch.arange(h, device=device, dtype=dtype)[:, None].expand(h, w)
        cols = torch.arange(w, device=device, dtype=dtype)[None, :].expand(h, w)
        grid = torch.stack([rows, cols], dim=-1).reshape(n, 2)
        positions = torch.cat([torch.zeros(num_prefix, 2, device=device, dtype=dtype), grid]).expand(batch, -1, -1)
        num_tokens = torch.full((batch,), num_prefix + n, device=device, dtype=torch.long)
        return cls(tuple(grid_size), num_prefix, index_map, sizes, positions, num_tokens, total_tokens=batch * (num_prefix + n))

    @property
    def seq_len(self) -> int:
        return self.sizes.shape[1]

    def valid_mask(self) -> Optional[Tensor]:
        """``[B, T]`` bool of real tokens, or None when no image has padding."""
        if not self.padded:
            return None
        return torch.arange(self.seq_len, device=self.sizes.device) < self.num_tokens[:, None]

    def attention_bias(self, prop_attn: bool, dtype: torch.dtype) -> Optional[Tensor]:
        """Additive key bias ``[B, 1, 1, T]`` for SDPA: log(size) if ``prop_attn``, -inf on padding; None if neither."""
        if not prop_attn and not self.padded:
            return None
        sizes = self.sizes.to(dtype)
        if prop_attn:
            # log(0) = -inf masks padding slots, whose size is 0, in the same step.
            bias = sizes.log()
        else:
            bias = torch.zeros_like(sizes).masked_fill_(sizes == 0, float("-inf"))
        return bias[:, None, None, :]

    def apply(self, x: Tensor, dest: Tensor, num_tokens: Tensor, seq_len: int, padded: bool,
              total_tokens: Optional[int] = None) -> Tuple[Tensor, "MergeState"]:
        """Merge ``x`` ``[B, T, C]`` by the plan ``dest`` ``[B, T]``: token -> slot ``< seq_len``; padding tokens of a
        padded batch point at ``>= seq_len`` (dropped).

        ``num_tokens`` ``[B]`` are the valid tokens each image keeps, ``seq_len`` their maximum and ``total_tokens``
        their sum (host int, optional). The sums run in
        float32 whatever ``x``'s dtype (bf16 cannot add many members exactly). Returns the merged tokens
        ``[B, seq_len, C]`` (size-weighted means, in ``x``'s dtype) and the new state.
        """
        b, t = dest.shape
        sizes = self.sizes.float()
        # One flat index per token: image i's slot j is row i * seq_len + j, so the sums come out as contiguous
        # [B, seq_len, ·] blocks. Tokens routed past seq_len (padding) go to one extra block of trash slots (whatever
        # their values, even NaN, they never reach a real slot), spread over it: a slot that collected all of them
        # would be summed in one long serial run by the sorted accumulation.
        offsets = torch.arange(b, device=dest.device)[:, None] * seq_len
        trash = b * seq_len + torch.arange(t, device=dest.device) % seq_len
        flat = torch.where(dest < seq_len, dest + offsets, trash).flatten()
        slots = (b + 1) * seq_len
        # sizes and size-weighted positions first; each token then enters its slot's sum already divided by the
        # slot's size, so the token sums are the means (contiguous, no division pass over [B, seq_len, C])
        weight = sizes[..., None]
        small = row_sums(torch.cat([weight, self.positions.float() * weight], dim=-1).flatten(0, 1), flat, slots)
        slot_sizes = small[:, 0].clamp(min=1.0)  # padding slots have size 0; every real slot has size >= 1
        share = sizes.flatten() / slot_sizes[flat]
        means = row_sums(x.flatten(0, 1).float() * share[:, None], flat, slots)[: b * seq_len]
        small = small[: b * seq_len].view(b, seq_len, -1)
        new_sizes = small[..., 0]
        dims = self.positions.shape[-1]
        state = MergeState(
            grid_size=self.grid_size,
            num_prefix=self.num_prefix,
            index_map=dest.gather(1, self.index_map),
            sizes=new_sizes,
            positions=small[..., 1:1 + dims] / slot_sizes[: b * seq_len].view(b, seq_len, 1),
            num_tokens=num_tokens,
            padded=padded,
            merged=True,
            history=self.history,
            total_tokens=total_tokens,
        )
        return means.view(b, seq_len, -1).to(x.dtype), state

    def permute(self, x: Tensor, dest: Tensor) -> Tuple[Tensor, "MergeState"]:
        """Apply a plan that merges nothing (``dest`` a permutation of the slots): a reorder in ``x``'s own dtype,
        the same result as :meth:`apply` without its float32 sums."""
        def move(values: Tensor) -> Tensor:
            index = dest.view(*dest.shape, *([1] * (values.dim() - 2))).expand_as(values)
            return torch.empty_like(values).scatter_(1, index, values)

        state = MergeState(grid_size=self.grid_size, num_prefix=self.num_prefix,
                           index_map=dest.gather(1, self.index_map), sizes=move(self.sizes),
                           positions=move(self.positions), num_tokens=self.num_tokens, padded=False, merged=True,
                           history=self.history, total_tokens=self.total_tokens)
        return move(x), state

    def unmerge(self, tokens: Tensor) -> Tensor:
        """Restore the grid: ``tokens`` ``[B, T, C]`` (full sequence) → ``[B, H*W, C]``, each cell its slot's value."""
        return tokens.gather(1, self.index_map[..., None].expand(-1, -1, tokens.shape[-1]))

    def unmerge_patches(self, patches: Tensor) -> Tensor:
        """Like :meth:`unmerge` for a sequence without its prefix tokens (``[B, T - P, C]``)."""
        index = (self.index_map - self.num_prefix)[..., None].expand(-1, -1, patches.shape[-1])
        return patches.gather(1, index)

    def unmerge_to_grid(self, tokens: Tensor) -> Tensor:
        """Full merged sequence ``[B, T, C]`` → ``[B, C, H, W]`` feature map."""
        h, w = self.grid_size
        grid = self.unmerge(tokens)
        return grid.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)

    def record_layer(self) -> "MergeState":
        """This state with its current token counts appended to the history (the backbone calls it once per
        block)."""
        return dataclasses.replace(self, history=self.history + (self.num_tokens,))

    def stats(self) -> Dict[str, Any]:
        """What a network reports as ``merge_stats``: ``tokens_per_layer`` (per block, per image, prefix included),
        ``initial_tokens`` (entering block 1) and ``num_prefix``."""
        h, w = self.grid_size
        return {"tokens_per_layer": self.tokens_per_layer(), "initial_tokens": self.num_prefix + h * w,
                "num_prefix": self.num_prefix}

    def tokens_per_layer(self) -> List[List[int]]:
        """Tokens leaving each recorded block, one list of ints (one per image, prefix included) per block."""
        if not self.history:
            return []
        return torch.stack(self.history).tolist()
