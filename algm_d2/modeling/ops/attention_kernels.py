"""Which fused attention kernels ``scaled_dot_product_attention`` may pick for token sequences whose length the data
decides (ALGM's merged tokens).

On Hopper, torch's first choice for half-precision SDPA is cuDNN's attention, which builds an execution plan for
every new input shape; a merged sequence has a new length in nearly every batch, so each batch would pay for new
plans (the cost per shape is measured in docs/BENCHMARKS.md). Flash attention and the memory-efficient kernel need
no plan, so merged sequences use those (and the math kernel as the fallback); fixed shapes keep torch's choice.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch has no cuDNN attention either
    sdpa_kernel = None

PLAN_FREE_BACKENDS = ((SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
                      if sdpa_kernel is not None else ())


def dynamic_length_attention(dynamic: bool = True) -> ContextManager[None]:
    """A context in which SDPA uses only kernels without per-shape plans when ``dynamic`` (sequence lengths depend
    on the data), else a no-op. (The switches are torch's global SDPA flags; the kernels kept are the ones the CPU
    uses, so CPU results do not change.)"""
    if not dynamic or sdpa_kernel is None or torch.compiler.is_compiling():  # compiled graphs choose their own
        return nullcontext()
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled()}
    # the caller's own restrictions stay in force (math remains when the caller disabled every other kernel)
    return sdpa_kernel([backend for backend in PLAN_FREE_BACKENDS if enabled[backend]] or [SDPBackend.MATH])
