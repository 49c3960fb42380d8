"""The config node: fvcore's CfgNode (yacs + ``_BASE_``) with two conveniences and strict errors.

- An int given for a float key is taken as that float (YAML ``LR: 1``).
- A few keys take values of more than one type (ALGM thresholds: a float τ, "batch_stats", "top:R",
  "fraction:F" or null); ``FLEXIBLE_KEYS`` lists them with the types they accept. Their meaning is checked where
  they are used (``algm_d2.modeling.algm_config_from_cfg`` raises ValueError naming the key), which train_net does
  at start-up.
Unknown keys raise ``KeyError`` naming the full key; other type mismatches raise ``ValueError`` naming it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

import yaml
from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvcoreCfgNode

_RULE_TYPES = (float, int, str, type(None))
# full key -> the value types it accepts
FLEXIBLE_KEYS: Dict[str, Tuple[type, ...]] = {
    "MODEL.ALGM.LOCAL_THRESHOLD": _RULE_TYPES,
    "MODEL.ALGM.GLOBAL_THRESHOLD": _RULE_TYPES,
}


class _StructureLoader(yaml.SafeLoader):
    """Reads a config's structure only: a tag that would construct a Python object (detectron2 and Mask2Former
    configs use ``!!python/object/apply:eval``) reads as None, so checking never executes anything; whether such a
    file may be loaded is the loader's decision (``allow_unsafe``)."""


_StructureLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def check_config_file(filename: str, chain: Sequence[str] = (),
                      resolve: Callable[[str], str] = lambda name: name) -> None:
    """Raise naming the file when a config file or one of its ``_BASE_`` files is missing, empty, not a mapping,
    or inherits from itself (directly or in a cycle); ``_BASE_`` paths resolve as fvcore resolves them, then through
    ``resolve`` (a config class's own path rules)."""
    filename = resolve(filename)
    path = os.path.realpath(filename)
    if path in chain:
        cycle = " -> ".join([*chain[chain.index(path):], path])
        raise ValueError(f"config _BASE_ cycle: {cycle}")
    if not os.path.isfile(filename):
        named_by = f" (the _BASE_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file {filename}{named_by}: no such file")
    with open(filename) as f:
        try:
            data = yaml.load(f, Loader=_StructureLoader)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {filename} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a YAML {type(data).__name__}"
        raise ValueError(f"config file {filename} is {what}; a config is a mapping of KEY: value")
    bases = data.get(BASE_KEY, [])
    for base in bases if isinstance(bases, list) else [bases]:
        base = os.path.expanduser(str(base))
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(filename), base)
        check_config_file(base, (*chain, path), resolve)


class CfgNode(_FvcoreCfgNode):
    @classmethod
    def resolve_config_path(cls, filename: str) -> str:
        """The file a config path (a ``--config-file`` or a ``_BASE_``) names; subclasses add their own schemes."""
        return filename

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        check_config_file(cfg_filename, resolve=self.resolve_config_path)
        super().merge_from_file(cfg_filename, allow_unsafe=allow_unsafe)

    def merge_from_other_cfg(self, cfg_other: "CfgNode") -> None:
        self._prepare_merge(cfg_other, prefix="")
        super().merge_from_other_cfg(cfg_other)
        self.check_flexible_keys()

    def merge_from_list(self, cfg_list: List[Any]) -> None:
        """``KEY VALUE`` pairs (command line); values are decoded as YAML literals like yacs does."""
        if len(cfg_list) % 2:
            raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd list: {cfg_list}")
        tree: Dict[str, Any] = {}
        for full_key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
            node = tree
            *parents, leaf = str(full_key).split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = self._decode_cfg_value(raw)
        self.merge_from_other_cfg(type(self)(tree))

    def _prepare_merge(self, other: Dict[str, Any], prefix: str) -> None:
        for key, value in other.items():
            full_key = prefix + key
            if key not in self:
                raise KeyError(f"Non-existent config key: {full_key}")
            current = self[key]
            if isinstance(current, _FvcoreCfgNode) and isinstance(value, dict):
                current._prepare_merge(value, full_key + ".")  # type: ignore[attr-defined]
            elif full_key in FLEXIBLE_KEYS:
                # yacs accepts any type over a None default; check_flexible_keys checks it afterwards.
                self[key] = None
            elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
                other[key] = float(value)

    def check_flexible_keys(self) -> None:
        for full_key, types in FLEXIBLE_KEYS.items():
            node: Any = self
            for part in full_key.split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                if isinstance(node, bool) or not isinstance(node, types):
                    raise ValueError(f"{full_key}: {node!r} has type {type(node).__name__}, expected one of "
                                     f"{', '.join(t.__name__ for t in types)}")
