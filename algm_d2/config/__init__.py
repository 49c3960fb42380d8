"""Config: ``get_cfg()`` (every key with its default and a comment) on fvcore's CfgNode with ``_BASE_`` files."""
from .config import FLEXIBLE_KEYS, CfgNode
from .defaults import PRECISIONS, add_algm_config, get_cfg, precision_dtype, resolve_device

__all__ = ["CfgNode", "get_cfg", "add_algm_config", "FLEXIBLE_KEYS", "PRECISIONS", "precision_dtype",
           "resolve_device"]
