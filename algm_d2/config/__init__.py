"""Config: ``get_cfg()`` (every key with its default and a comment) on fvcore's CfgNode with ``_BASE_`` files."""
from .config import FLEXIBLE_KEYS, CfgNode
from .defaults import add_algm_config, get_cfg, resolve_device

__all__ = ["CfgNode", "get_cfg", "add_algm_config", "FLEXIBLE_KEYS", "resolve_device"]
