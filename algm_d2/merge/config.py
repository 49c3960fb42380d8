"""ALGM options: one dataclass, validated on construction, with the rules each stage can use."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Union

BATCH_POLICIES = ("min", "per_image")


@dataclass(frozen=True)
class FixedLevel:
    """Merge a set number of groups whatever their scores: ``count`` best groups, or ``fraction`` of the candidates.

    Candidates are the full k×k windows for CLAP and the mergeable A-side tokens for GBM. Used to benchmark at set
    token counts (the paper's levels) and for ToMe-style comparisons. ``FixedLevel(count=0)`` merges nothing: the
    stage knows it and skips its work.
    """

    count: Optional[int] = None
    fraction: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ValueError(f"FixedLevel needs exactly one of count or fraction, got {self}")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 0):
            raise ValueError(f"FixedLevel.count must be a non-negative int, got {self.count!r}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"FixedLevel.fraction must lie in [0, 1], got {self.fraction!r}")

    def __str__(self) -> str:
        return f"top:{self.count}" if self.count is not None else f"fraction:{self.fraction}"


# A stage's rule: τ (merge scores >= τ), "batch_stats" (the release's mean + std / layer), a FixedLevel, or None (off).
Rule = Union[float, str, FixedLevel, None]


def parse_rule(value: object, name: str) -> Rule:
    """Turn a user value (float, "batch_stats", "top:R", "fraction:F", "none"/None) into a rule; ValueError names ``name``."""
    if value is None or isinstance(value, FixedLevel):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name}: a boolean is not a threshold rule ({value!r})")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name}: threshold must be finite, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("none", "off", "null", ""):
            return None
        if text == "batch_stats":
            return "batch_stats"
        if text.startswith("top:"):
            try:
                return FixedLevel(count=int(text[4:]))
            except ValueError as err:
                raise ValueError(f"{name}: bad fixed count in {value!r}: {err}") from None
        if text.startswith("fraction:"):
            try:
                return FixedLevel(fraction=float(text[9:]))
            except ValueError as err:
                raise ValueError(f"{name}: bad fixed fraction in {value!r}: {err}") from None
        try:
            return parse_rule(float(text), name)
        except ValueError:
            pass
    raise ValueError(
        f"{name}: unknown threshold rule {value!r}; use a float τ, 'batch_stats', 'top:<count>', "
        f"'fraction:<0..1>' or None"
    )


@dataclass(frozen=True)
class ALGMConfig:
    """Where and how ALGM merges. Layers are 1-based (block index + 1), as in the paper.

    A stage is off when its layer or its rule is None. ``window`` is CLAP's (rows, cols) window; windows cut by
    the grid border are never merged (their cells stay tokens of their own), so any H×W grid works.
    """

    local_layer: Optional[int] = 1
    global_layer: Optional[int] = 5
    window: Tuple[int, int] = (2, 2)
    local_threshold: Rule = 0.88
    global_threshold: Rule = "batch_stats"
    batch_policy: Literal["min", "per_image"] = "min"
    prop_attn: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_threshold", parse_rule(self.local_threshold, "local_threshold"))
        object.__setattr__(self, "global_threshold", parse_rule(self.global_threshold, "global_threshold"))
        window = tuple(self.window) if isinstance(self.window, (list, tuple)) else (self.window, self.window)
        if len(window) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) for k in window):
            raise ValueError(f"window must be two ints (rows, cols), got {self.window!r}")
        if min(window) < 1 or window[0] * window[1] < 2:
            raise ValueError(f"window must be positive and cover at least 2 cells, got {self.window!r}")
        object.__setattr__(self, "window", window)
        for name in ("local_layer", "global_layer"):
            layer = getattr(self, name)
            if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 1):
                raise ValueError(f"{name} must be a 1-based layer number >= 1 or None, got {layer!r}")
        if self.local_active and self.global_active and self.global_layer < self.local_layer:
            raise ValueError(
                f"global_layer ({self.global_layer}) must not come before local_layer ({self.local_layer}): "
                "CLAP needs the full grid"
            )
        if self.batch_policy not in BATCH_POLICIES:
            raise ValueError(f"batch_policy must be one of {BATCH_POLICIES}, got {self.batch_policy!r}")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be a bool, got {self.prop_attn!r}")

    @property
    def local_active(self) -> bool:
        return self.local_layer is not None and self.local_threshold is not None

    @property
    def global_active(self) -> bool:
        return self.global_layer is not None and self.global_threshold is not None

    @property
    def enabled(self) -> bool:
        return self.local_active or self.global_active

    @property
    def data_dependent(self) -> bool:
        """Whether token counts depend on the images (an active stage with a threshold rule), so that sequence
        lengths change from batch to batch; the plain model and fixed levels keep one shape per input size."""
        return any(active and not isinstance(rule, FixedLevel)
                   for rule, active in ((self.local_threshold, self.local_active),
                                        (self.global_threshold, self.global_active)))

    def merges_at(self, layer: int) -> bool:
        """Whether a stage runs after the attention of 1-based ``layer``."""
        return (self.local_active and layer == self.local_layer) or (self.global_active and layer == self.global_layer)

    def check_depth(self, depth: int) -> None:
        """Raise ValueError if an active stage's layer does not exist in a model of ``depth`` blocks."""
        for name, active in (("local_layer", self.local_active), ("global_layer", self.global_active)):
            layer = getattr(self, name)
            if active and layer > depth:
                raise ValueError(f"{name}={layer} is out of range for a model with {depth} blocks (1..{depth})")


OFF = ALGMConfig(local_layer=None, global_layer=None)
