"""algm_d2's keys inside a detectron2 config, next to detectron2's and Mask2Former's own.

``add_algm_config(cfg)`` goes after Mask2Former's ``add_maskformer2_config(cfg)`` (which replaces MODEL.MASK_FORMER
wholesale). It adds every key the bridged modules read that detectron2 and Mask2Former do not declare, with
algm_d2's default (:func:`algm_d2.config.get_cfg` stays the one place a key is declared); a key they already declare
keeps its value and its meaning, e.g. MODEL.PIXEL_MEAN in INPUT.FORMAT order, MODEL.MASK_FORMER.CLASS_WEIGHT 1.0,
SOLVER.OPTIMIZER "ADAMW". It also gives ``cfg`` algm_d2's merge rules (:class:`CfgNode`: its nodes change class
in place), so that the ALGM threshold keys take a float or a rule string ("batch_stats", "top:R", "fraction:F") from
files and command lines.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Tuple

from detectron2.config import CfgNode as D2CfgNode

from ..config import get_cfg as algm_get_cfg
from ..config.config import CfgNode as AlgmCfgNode

# algm_d2 nodes the bridged backbones, heads and meta-architectures read (their missing keys are added).
BRIDGED_NODES: Tuple[str, ...] = ("MODEL.BACKBONE", "MODEL.ALGM", "MODEL.VIT_ADAPTER", "MODEL.SEM_SEG_HEAD",
                                  "MODEL.MASK_FORMER")
# Single algm_d2 keys they read: layer decay (optimizer) and the test-time inference of the bridged segmentors.
BRIDGED_KEYS: Tuple[str, ...] = ("SOLVER.LAYER_DECAY", "TEST.MODE", "TEST.CROP_SIZE", "TEST.STRIDE",
                                 "TEST.BATCH_SIZE", "TEST.SOFTMAX_VIEWS", "TEST.SLIDE_SMALL_IMAGE")
# A ``_BASE_`` starting with this names a file of the Mask2Former checkout that ``import mask2former`` finds.
MASK2FORMER_PREFIX = "mask2former://"


def mask2former_root() -> Path:
    """The Mask2Former checkout on the path (the folder that holds ``mask2former/``, ``configs/``, ``train_net.py``)."""
    import mask2former

    return Path(mask2former.__file__).resolve().parent.parent


class CfgNode(AlgmCfgNode, D2CfgNode):
    """detectron2's CfgNode (versions, ``_BASE_``) with algm_d2's merge rules: flexible ALGM threshold keys, ints
    taken for float keys, ``_BASE_: mask2former://configs/...`` resolved in the Mask2Former checkout."""

    @classmethod
    def resolve_config_path(cls, filename: str) -> str:
        # fvcore joins a relative _BASE_ to the including file's folder: the prefix may sit mid-path
        if MASK2FORMER_PREFIX not in filename:
            return filename
        relative = filename.split(MASK2FORMER_PREFIX, 1)[1]
        resolved = str(mask2former_root() / relative)
        if not os.path.isfile(resolved):
            raise FileNotFoundError(f"{MASK2FORMER_PREFIX}{relative}: no such file in the Mask2Former checkout "
                                    f"{mask2former_root()}")
        return resolved

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> Any:
        return super().load_yaml_with_base(cls.resolve_config_path(filename), allow_unsafe=allow_unsafe)

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = True) -> None:
        # detectron2's default: its and Mask2Former's configs compute some values with !!python/object/apply:eval
        super().merge_from_file(cfg_filename, allow_unsafe=allow_unsafe)

    def __setitem__(self, key: str, value: Any) -> None:
        # a node added later (another project's add_*_config) joins the tree's class, or merging into it fails
        if isinstance(value, D2CfgNode):
            _upgrade(value)
        super().__setitem__(key, value)


def _node(cfg: D2CfgNode, path: str) -> D2CfgNode:
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def _add_missing(target: D2CfgNode, defaults: AlgmCfgNode) -> None:
    """Copy the keys of ``defaults`` that ``target`` lacks (sub-nodes recursively), leaving its own keys alone."""
    for key, value in defaults.items():
        if key not in target:
            target[key] = CfgNode(value) if isinstance(value, dict) else value
        elif isinstance(value, dict) and isinstance(target[key], dict):
            _add_missing(target[key], value)


def _upgrade(node: D2CfgNode) -> None:
    """Give every node of the tree algm_d2's merge rules in place (as detectron2 upgrades optimizers to clipping
    ones): yacs merges a node only into a node of the same class, so the whole tree changes class at once."""
    if type(node) is D2CfgNode:
        object.__setattr__(node, "__class__", CfgNode)  # yacs' __setattr__ accepts config values only
    for value in node.values():
        if isinstance(value, D2CfgNode):
            _upgrade(value)


def add_algm_config(cfg: D2CfgNode) -> None:
    """Add algm_d2's keys to a detectron2 config that already has Mask2Former's (see the module docstring)."""
    if not isinstance(cfg, D2CfgNode):
        raise TypeError(f"add_algm_config expects detectron2's CfgNode (detectron2.config.get_cfg()), got "
                        f"{type(cfg).__name__}; algm_d2's own config comes from algm_d2.config.get_cfg()")
    if "MASK_FORMER" not in cfg.MODEL or "TRANSFORMER_DECODER_NAME" not in cfg.MODEL.MASK_FORMER:
        raise ValueError("MODEL.MASK_FORMER: call Mask2Former's add_maskformer2_config(cfg) before "
                         "add_algm_config(cfg) (it replaces MODEL.MASK_FORMER wholesale)")
    if cfg.is_frozen():
        raise ValueError("add_algm_config needs an unfrozen config (call it before cfg.freeze())")
    _upgrade(cfg)
    defaults = algm_get_cfg()
    for path in BRIDGED_NODES:
        parent, _, name = path.rpartition(".")
        target = _node(cfg, parent)
        if name not in target:
            target[name] = CfgNode()
        _add_missing(target[name], _node(defaults, path))
    for path in BRIDGED_KEYS:
        parent, _, name = path.rpartition(".")
        target = _node(cfg, parent)
        if name not in target:
            target[name] = _node(defaults, parent)[name]
    if "PRECISION" not in cfg.SOLVER.AMP:
        # Only in detectron2 (algm_d2's own trainer has DEEPSPEED.PRECISION): the autocast dtype of detectron2's
        # AMPTrainer when SOLVER.AMP.ENABLED, "float16" (detectron2's) or "bfloat16" (algm_d2.d2.train_net).
        cfg.SOLVER.AMP.PRECISION = "float16"


def get_cfg() -> CfgNode:
    """detectron2's defaults + DeepLab's (poly lr schedule) + Mask2Former's + algm_d2's: Mask2Former's
    ``train_net.setup`` with :func:`add_algm_config` added."""
    from detectron2.config import get_cfg as d2_get_cfg
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    cfg = d2_get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_algm_config(cfg)
    return cfg
