"""ALGM options: one dataclass, validated on construction, with the rules each stage can use."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Union

BATCH_POLICIES = ("min", "per_image")
# The module at ``local_layer`` (Table 5b of the paper places GBM there too).
LOCAL_METHODS = ("clap", "gbm")
# What a merged group's token holds: the size-weighted mean (ALGM) or one member drawn at random (Table 6).
MERGE_VALUES = ("average", "random")


class ALGMConfigError(ValueError):
    """A bad ALGM option; ``field`` names the :class:`ALGMConfig` field (or the name given to :func:`parse_rule`), so a
    config translator can name its own key for it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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
    """Turn a user value (float, "batch_stats", "top:R", "fraction:F", "none"/None) into a rule; an
    :class:`ALGMConfigError` (a ValueError) names ``name``."""
    if value is None or isinstance(value, FixedLevel):
        return value
    if isinstance(value, bool):
        raise ALGMConfigError(name, f"{name}: a boolean is not a threshold rule ({value!r})")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ALGMConfigError(name, f"{name}: threshold must be finite, got {value!r}")
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
                raise ALGMConfigError(name, f"{name}: bad fixed count in {value!r}: {err}") from None
        if text.startswith("fraction:"):
            try:
                return FixedLevel(fraction=float(text[9:]))
            except ValueError as err:
                raise ALGMConfigError(name, f"{name}: bad fixed fraction in {value!r}: {err}") from None
        try:
            return parse_rule(float(text), name)
        except ValueError:
            pass
    raise ALGMConfigError(
        name, f"{name}: unknown threshold rule {value!r}; use a float τ, 'batch_stats', 'top:<count>', "
        f"'fraction:<0..1>' or None"
    )


@dataclass(frozen=True)
class ALGMConfig:
    """Where and how ALGM merges. Layers are 1-based (block index + 1), as in the paper.

    A stage is off when its layer or its rule is None. ``window`` is CLAP's (rows, cols) window, always a pair
    (a square window is ``(k, k)``); windows cut by the grid border are never merged (their cells stay tokens of
    their own), so any H×W grid works. ``prop_attn`` adds log(size) to the logits of each merged key in every
    attention that reads merged tokens: the encoder's blocks and the decoders that run on merged tokens (off in the
    release). Bad values raise :class:`ALGMConfigError`, which names the field.

    Comparison and ablation modes (the paper's Tables 1, 5 and 6):
        local_method: the module at ``local_layer``: "clap" (ALGM) or "gbm" (global merging there, with
            ``local_threshold`` as its rule).
        tome_r: ToMe's bipartite soft matching, merging ``tome_r`` tokens after the attention of every layer (or of
            ``tome_layers`` when given); 0 = off. ToMe replaces CLAP and GBM, so those must be off.
        merge_value: "average" (size-weighted mean of a group) or "random" (a random member's value, drawn with
            probability proportional to its size: no denoising, Table 6).
        reduce_tokens: False keeps every token and gives each member of a merged group the group's value (no
            attention balancing, Table 6); groups are formed as in the reduced model.
    """

    local_layer: Optional[int] = 1
    global_layer: Optional[int] = 5
    window: Tuple[int, int] = (2, 2)
    local_threshold: Rule = 0.88
    global_threshold: Rule = "batch_stats"
    batch_policy: Literal["min", "per_image"] = "min"
    prop_attn: bool = False
    local_method: Literal["clap", "gbm"] = "clap"
    tome_r: int = 0
    tome_layers: Tuple[int, ...] = ()
    merge_value: Literal["average", "random"] = "average"
    reduce_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_threshold", parse_rule(self.local_threshold, "local_threshold"))
        object.__setattr__(self, "global_threshold", parse_rule(self.global_threshold, "global_threshold"))
        window = tuple(self.window) if isinstance(self.window, (list, tuple)) else None
        if window is None or len(window) != 2 or not all(isinstance(k, int) and not isinstance(k, bool)
                                                         for k in window):
            raise ALGMConfigError("window", f"window must be two ints (rows, cols), got {self.window!r}")
        if min(window) < 1 or window[0] * window[1] < 2:
            raise ALGMConfigError("window", f"window must be positive and cover at least 2 cells, got {self.window!r}")
        object.__setattr__(self, "window", window)
        for name in ("local_layer", "global_layer"):
            layer = getattr(self, name)
            if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 1):
                raise ALGMConfigError(name, f"{name} must be a 1-based layer number >= 1 or None, got {layer!r}")
        if self.local_active and self.global_active and self.global_layer < self.local_layer:
            raise ALGMConfigError(
                "global_layer",
                f"global_layer ({self.global_layer}) must not come before local_layer ({self.local_layer}): "
                "CLAP needs the full grid"
            )
        if self.batch_policy not in BATCH_POLICIES:
            raise ALGMConfigError("batch_policy",
                                  f"batch_policy must be one of {BATCH_POLICIES}, got {self.batch_policy!r}")
        for name in ("prop_attn", "reduce_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ALGMConfigError(name, f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.local_method not in LOCAL_METHODS:
            raise ALGMConfigError("local_method",
                                  f"local_method must be one of {LOCAL_METHODS}, got {self.local_method!r}")
        if self.merge_value not in MERGE_VALUES:
            raise ALGMConfigError("merge_value", f"merge_value must be one of {MERGE_VALUES}, got {self.merge_value!r}")
        if not isinstance(self.tome_r, int) or isinstance(self.tome_r, bool) or self.tome_r < 0:
            raise ALGMConfigError("tome_r", f"tome_r must be a non-negative int, got {self.tome_r!r}")
        layers = tuple(self.tome_layers) if isinstance(self.tome_layers, (list, tuple)) else None
        if layers is None or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in layers):
            raise ALGMConfigError("tome_layers", "tome_layers must be 1-based layer numbers (empty: every layer), "
                                                 f"got {self.tome_layers!r}")
        object.__setattr__(self, "tome_layers", tuple(sorted(set(layers))))
        if self.tome_active and (self.local_active or self.global_active):
            raise ALGMConfigError("tome_r", f"tome_r ({self.tome_r}): ToMe replaces CLAP and GBM; switch them off "
                             "(local_layer and global_layer None)")

    @property
    def local_active(self) -> bool:
        return self.local_layer is not None and self.local_threshold is not None

    @property
    def global_active(self) -> bool:
        return self.global_layer is not None and self.global_threshold is not None

    @property
    def tome_active(self) -> bool:
        return self.tome_r > 0

    @property
    def enabled(self) -> bool:
        return self.local_active or self.global_active or self.tome_active

    def stages_at(self, layer: int) -> Tuple[str, ...]:
        """The stages after the attention of 1-based ``layer``, in order: "clap", "local_gbm", "gbm", "tome"."""
        stages = []
        if self.local_active and layer == self.local_layer:
            stages.append("clap" if self.local_method == "clap" else "local_gbm")
        if self.global_active and layer == self.global_layer:
            stages.append("gbm")
        if self.tome_active and (not self.tome_layers or layer in self.tome_layers):
            stages.append("tome")
        return tuple(stages)

    @property
    def data_dependent(self) -> bool:
        """Whether token counts depend on the images (an active stage with a threshold rule), so that sequence
        lengths change from batch to batch; the plain model and fixed levels keep one shape per input size."""
        return any(active and not isinstance(rule, FixedLevel)
                   for rule, active in ((self.local_threshold, self.local_active),
                                        (self.global_threshold, self.global_active)))

    def merges_at(self, layer: int) -> bool:
        """Whether a stage runs after the attention of 1-based ``layer``."""
        return bool(self.stages_at(layer))

    def check_depth(self, depth: int) -> None:
        """Raise :class:`ALGMConfigError` if an active stage's layer does not exist in a model of ``depth`` blocks."""
        for name, active in (("local_layer", self.local_active), ("global_layer", self.global_active)):
            layer = getattr(self, name)
            if active and layer > depth:
                raise ALGMConfigError(name, f"{name}={layer} is out of range for a model with {depth} blocks "
                                            f"(1..{depth})")
        if self.tome_active and self.tome_layers and self.tome_layers[-1] > depth:
            raise ALGMConfigError("tome_layers", f"tome_layers={list(self.tome_layers)} reach past a model with "
                                                 f"{depth} blocks (1..{depth})")


OFF = ALGMConfig(local_layer=None, global_layer=None)
