"""The τ = μ + σ calibration's result as a config: a YAML that ``_BASE_``s the calibrated config and sets the
thresholds of its CLAP and GBM layers (train and evaluate with it as with any config)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import yaml

from ..merge.calibration import layer_thresholds


def calibrated_thresholds_for(result: Mapping[str, Any], local_layer: Optional[int], global_layer: Optional[int]
                              ) -> Dict[str, float]:
    """{"LOCAL_THRESHOLD": τ of the local layer, "GLOBAL_THRESHOLD": τ of the global layer} for the layers the
    calibration measured; a configured layer it did not measure raises naming it."""
    layers = layer_thresholds(result)
    values = {}
    for key, layer in (("LOCAL_THRESHOLD", local_layer), ("GLOBAL_THRESHOLD", global_layer)):
        if layer is None:
            continue
        if layer not in layers:
            raise ValueError(f"MODEL.ALGM.{key.split('_')[0]}_LAYER={layer}: the calibration has no threshold for it "
                             f"(it measured layers {sorted(layers)})")
        values[key] = layers[layer]
    return values


def write_calibrated_config(path: str, base_config: str, result: Mapping[str, Any], local_layer: Optional[int],
                            global_layer: Optional[int]) -> Dict[str, float]:
    """Write the YAML at ``path`` (``_BASE_`` relative to it) and return the thresholds it sets."""
    values = calibrated_thresholds_for(result, local_layer, global_layer)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(Path(base_config).resolve(), out.parent.resolve())
    stats = "; ".join(f"layer {layer}: μ {entry['mean']:.4f}, σ {entry['std']:.4f}, {entry['images']} images"
                      for layer, entry in sorted(result["layers"].items(), key=lambda item: int(item[0])))
    body = yaml.safe_dump({"_BASE_": base, "MODEL": {"ALGM": {"ENABLED": True, **values}}}, sort_keys=False)
    out.write_text(f"# ALGM thresholds τ = μ + σ of all-pair token cosines on the base model ({stats}).\n{body}")
    return values
