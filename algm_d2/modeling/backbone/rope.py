"""Rotary phases for merged tokens (EVA-02): evaluate a timm 2-D RoPE at fractional (mean) grid positions.

timm's axial RoPE variants give every channel a phase that is affine in one grid axis (an index or pixel coordinate,
optionally rescaled to a reference grid, times a frequency band). Rather than re-deriving each timm option, the
affine map is read off timm's own embedding of the grid — phase at (0, 0) plus one step per row and per column —
and checked against the whole grid, so a RoPE variant that is not affine is refused instead of silently mis-rotated.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor


def _wrap(angle: Tensor) -> Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


class RotaryPhases:
    """Affine rotary phases ``θ(r, c) = θ0 + r·Δr + c·Δc`` per channel, fitted to a timm sin‖cos grid embedding."""

    def __init__(self, grid_embed: Tensor, grid_size: Tuple[int, int], atol: float = 1e-4) -> None:
        h, w = grid_size
        sin, cos = grid_embed.float().chunk(2, dim=-1)
        theta = torch.atan2(sin, cos).reshape(h, w, -1)
        self.origin = theta[0, 0]
        self.row_step = _wrap(theta[1, 0] - theta[0, 0]) if h > 1 else torch.zeros_like(self.origin)
        self.col_step = _wrap(theta[0, 1] - theta[0, 0]) if w > 1 else torch.zeros_like(self.origin)
        rows = torch.arange(h, dtype=torch.float32, device=theta.device)
        cols = torch.arange(w, dtype=torch.float32, device=theta.device)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
        error = (self.embed(grid) - grid_embed.float()).abs().max()
        if error > atol:
            raise NotImplementedError(
                f"this RoPE is not affine in the grid position (max error {float(error):.2e}); merged tokens cannot "
                "be given rotary phases from their mean position"
            )

    def embed(self, positions: Tensor) -> Tensor:
        """sin‖cos embedding ``[..., 2·D]`` at (row, col) ``positions`` ``[..., 2]`` (fractional allowed)."""
        phase = self.origin + positions[..., :1] * self.row_step + positions[..., 1:] * self.col_step
        return torch.cat([phase.sin(), phase.cos()], dim=-1)
