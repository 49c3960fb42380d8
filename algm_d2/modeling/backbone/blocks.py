"""The two halves of a timm pre-norm block as functions of the block, run eagerly or compiled.

The wrappers (:class:`ALGMViT`, Segmenter's mask transformer) run each block as ``x + attention`` and ``x + MLP``
halves so that ALGM can merge between them. :class:`BlockRunner` holds the three functions that do it. Compiled
(:meth:`BlockRunner.compiled`, "regional compilation"), each function is one ``torch.compile(dynamic=True)`` graph:
the block is an argument, so one graph serves every block of a model, and the token count is symbolic, so one graph
serves every merge level and per-image packed total. The merges between the halves stay eager (their host syncs are
graph breaks by nature): this is the compiled path for thresholds, whose token counts change from batch to batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..ops.varlen_attention import packed_attention_residual


def attention_residual(block: nn.Module, eva: bool, x: Tensor, bias: Optional[Tensor], rope: Optional[Tensor]
                       ) -> Tensor:
    """``x + attn(norm1(x))`` of a timm ``Block`` (``eva`` False) or ``EvaBlock`` with layer scale and drop path;
    ``bias`` is the additive key bias, ``rope`` EVA-02's sin‖cos at the tokens' positions."""
    if eva:
        out = block.attn(block.norm1(x), rope=rope, attn_mask=bias)
        if block.gamma_1 is not None:
            out = block.gamma_1 * out
        return x + block.drop_path1(out)
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))


def mlp_residual(block: nn.Module, eva: bool, x: Tensor) -> Tensor:
    """``x + mlp(norm2(x))`` with the block's layer scale and drop path (padded ``[B, T, C]`` or packed ``[T, C]``)."""
    out = block.mlp(block.norm2(x))
    if eva:
        if block.gamma_2 is not None:
            out = block.gamma_2 * out
        return x + block.drop_path2(out)
    return x + block.drop_path2(block.ls2(out))


@dataclass(frozen=True)
class BlockRunner:
    """How a wrapper runs block halves: ``attention(block, eva, x, bias, rope)``, ``packed_attention(block, x,
    layout)`` (variable-length, packed tokens) and ``mlp(block, eva, x)``. The default runs them eagerly."""

    attention: Callable[..., Tensor] = attention_residual
    packed_attention: Callable[..., Tensor] = packed_attention_residual
    mlp: Callable[..., Tensor] = mlp_residual
    compile_mode: Optional[str] = None

    @classmethod
    def compiled(cls, mode: str = "default") -> "BlockRunner":
        """Each half under ``torch.compile(dynamic=True, mode=mode)``. CUDA graphs ("reduce-overhead") would record
        one graph per token count; use them for static shapes by compiling the whole forward instead."""
        if "reduce-overhead" in mode:
            raise ValueError(f"compile mode {mode!r}: the block halves run at data-dependent token counts; CUDA "
                             "graphs need static shapes (use 'default' or 'max-autotune-no-cudagraphs')")

        def compile_(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
            return torch.compile(fn, dynamic=True, mode=mode)

        return cls(attention=compile_(attention_residual), packed_attention=compile_(packed_attention_residual),
                   mlp=compile_(mlp_residual), compile_mode=mode)

    @property
    def is_compiled(self) -> bool:
        return self.compile_mode is not None


EAGER = BlockRunner()
