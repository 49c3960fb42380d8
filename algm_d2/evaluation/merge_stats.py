"""Token-count statistics of a merging model over an evaluation run.

After each forward the model exposes ``merge_stats`` (:class:`algm_d2.modeling.meta_arch.merging.MergeStats`):
{"tokens_per_layer": one list per encoder block of the token counts (one int per image, prefix tokens included)
leaving that block, "initial_tokens": tokens entering block 1 (prefix included), "num_prefix": class/register
tokens}. Layer numbers are 1-based, as in the paper.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch.distributed as dist

from ..merge import OFF
from ..modeling.meta_arch.merging import MergeStats

_REQUIRED_KEYS = tuple(MergeStats.__annotations__)


class MergeStatsAccumulator:
    """Collects per-image token counts; ``summary()`` reports mean kept-token ratios per block (patch tokens kept /
    patch tokens at the start, and the same with prefix tokens counted), the ALGM layers' figures and a
    histogram of the per-image counts. Ratios are means over images of each image's own ratio."""

    def __init__(self, *, local_layer: Optional[int] = None, global_layer: Optional[int] = None,
                 histogram_bins: int = 10):
        for name, layer in (("local_layer", local_layer), ("global_layer", global_layer)):
            if layer is not None and layer < 1:
                raise ValueError(f"MergeStatsAccumulator: {name} is 1-based, got {layer}")
        if histogram_bins < 1:
            raise ValueError(f"MergeStatsAccumulator: histogram_bins must be >= 1, got {histogram_bins}")
        self.local_layer = local_layer
        self.global_layer = global_layer
        self.histogram_bins = histogram_bins
        self.reset()

    @classmethod
    def for_model(cls, model: Any) -> "MergeStatsAccumulator":
        """ALGM layers of the model's ``algm`` (its ``ALGMConfig``; none when it does not merge or has none)."""
        algm = getattr(model, "algm", OFF)
        return cls(local_layer=algm.local_layer, global_layer=algm.global_layer)

    def reset(self) -> None:
        self._tokens: List[np.ndarray] = []  # [images, layers] per update
        self._initial: List[np.ndarray] = []  # [images] per update
        self._num_prefix: Optional[int] = None
        self._num_layers: Optional[int] = None

    @property
    def num_images(self) -> int:
        return sum(len(initial) for initial in self._initial)

    def update(self, merge_stats: Mapping[str, Any]) -> None:
        missing = [key for key in _REQUIRED_KEYS if key not in merge_stats]
        if missing:
            raise KeyError(f"merge_stats lacks {missing} (has {sorted(merge_stats)})")
        try:
            tokens = np.asarray(merge_stats["tokens_per_layer"], dtype=np.int64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"merge_stats['tokens_per_layer'] must be a list (one per block) of equally long "
                             f"lists of ints (one per image): {error}") from error
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"merge_stats['tokens_per_layer'] must be [blocks][images], got shape {tokens.shape}")
        initial_tokens = int(merge_stats["initial_tokens"])
        num_prefix = int(merge_stats["num_prefix"])
        num_layers = tokens.shape[0]
        if not 0 <= num_prefix < initial_tokens:
            raise ValueError(f"merge_stats: num_prefix {num_prefix} must be in [0, initial_tokens={initial_tokens})")
        if self._num_prefix is not None and num_prefix != self._num_prefix:
            raise ValueError(f"merge_stats['num_prefix'] changed from {self._num_prefix} to {num_prefix}")
        if self._num_layers is not None and num_layers != self._num_layers:
            raise ValueError(f"merge_stats['tokens_per_layer'] has {num_layers} blocks, earlier batches had "
                             f"{self._num_layers}")
        for name, layer in (("local_layer", self.local_layer), ("global_layer", self.global_layer)):
            if layer is not None and layer > num_layers:
                raise ValueError(f"MergeStatsAccumulator: {name} {layer} is beyond the {num_layers} blocks reported")
        out_of_range = (tokens < num_prefix) | (tokens > initial_tokens)
        if out_of_range.any():
            layer, image = np.argwhere(out_of_range)[0]
            raise ValueError(f"merge_stats['tokens_per_layer'][{layer}][{image}] = {tokens[layer, image]} is outside "
                             f"[num_prefix={num_prefix}, initial_tokens={initial_tokens}]")
        self._num_prefix, self._num_layers = num_prefix, num_layers
        self._tokens.append(tokens.T)
        self._initial.append(np.full(tokens.shape[1], initial_tokens, dtype=np.int64))

    def _gathered(self) -> List[tuple]:
        local = (self._tokens, self._initial, self._num_prefix)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
            return gathered
        return [local]

    def _histogram(self, counts: np.ndarray) -> Dict[str, Any]:
        histogram, edges = np.histogram(counts, bins=self.histogram_bins)
        p10, p50, p90 = np.percentile(counts, [10, 50, 90])
        return {"min": int(counts.min()), "max": int(counts.max()), "mean": float(counts.mean()),
                "std": float(counts.std()), "p10": float(p10), "p50": float(p50), "p90": float(p90),
                "bin_edges": edges.tolist(), "counts": histogram.tolist()}

    def summary(self) -> Dict[str, Any]:
        """Statistics over every rank's images (call it on every rank when distributed: it gathers). JSON-ready.

        {"num_images", "num_layers", "num_prefix", "initial_tokens_mean", "mean_tokens_per_layer",
        "kept_ratio_per_layer" (prefix excluded), "kept_ratio_with_prefix_per_layer", "algm_layers": {"local",
        "global": per-layer figures}, "final": the same for the last block}; per-layer figures are {"layer"
        (1-based), "mean_tokens", "kept_ratio", "kept_ratio_with_prefix", "tokens_per_image" (histogram with min,
        max, mean, std, p10/p50/p90, bin_edges, counts)}. Only {"num_images": 0} before any update.
        """
        gathered = self._gathered()
        tokens_parts = [part for rank_tokens, _, _ in gathered for part in rank_tokens]
        if not tokens_parts:
            return {"num_images": 0}
        prefixes = {num_prefix for _, _, num_prefix in gathered if num_prefix is not None}
        if len(prefixes) != 1:
            raise ValueError(f"merge_stats: ranks report different num_prefix values {sorted(prefixes)}")
        num_prefix = prefixes.pop()
        tokens = np.concatenate(tokens_parts).astype(np.float64)
        initial = np.concatenate([part for _, rank_initial, _ in gathered for part in rank_initial]).astype(np.float64)
        kept = (tokens - num_prefix) / (initial[:, None] - num_prefix)
        kept_with_prefix = tokens / initial[:, None]
        num_layers = tokens.shape[1]

        def layer_summary(layer: int) -> Dict[str, Any]:
            index = layer - 1
            return {"layer": layer, "mean_tokens": float(tokens[:, index].mean()),
                    "kept_ratio": float(kept[:, index].mean()),
                    "kept_ratio_with_prefix": float(kept_with_prefix[:, index].mean()),
                    "tokens_per_image": self._histogram(tokens[:, index].astype(np.int64))}

        algm_layers = {name: layer_summary(layer)
                       for name, layer in (("local", self.local_layer), ("global", self.global_layer))
                       if layer is not None}
        return {
            "num_images": int(tokens.shape[0]),
            "num_layers": num_layers,
            "num_prefix": num_prefix,
            "initial_tokens_mean": float(initial.mean()),
            "mean_tokens_per_layer": tokens.mean(axis=0).tolist(),
            "kept_ratio_per_layer": kept.mean(axis=0).tolist(),
            "kept_ratio_with_prefix_per_layer": kept_with_prefix.mean(axis=0).tolist(),
            "algm_layers": algm_layers,
            "final": layer_summary(num_layers),
        }
