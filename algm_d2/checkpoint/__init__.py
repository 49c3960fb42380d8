"""Loaders for released checkpoints (strict key/shape checks, ``weights_only=True`` by default)."""
from .segmenter import (
    NORMALIZATION, CheckpointMismatchError, build_from_variant, load_model, load_model_weights, load_state_dict_strict, read_state_dict,
    read_variant, save_release_checkpoint,
)
from .pretrained import load_pretrained_vit, read_pretrained
from .safe_load import UnreadableCheckpointError, UnsafeCheckpointError, load_checked

__all__ = [
    "NORMALIZATION", "CheckpointMismatchError", "build_from_variant", "load_model", "load_model_weights", "load_state_dict_strict",
    "read_state_dict", "read_variant", "save_release_checkpoint", "load_pretrained_vit", "read_pretrained",
    "UnreadableCheckpointError", "UnsafeCheckpointError", "load_checked",
]
