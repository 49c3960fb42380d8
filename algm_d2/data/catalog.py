"""The dataset registry: name -> (function returning records, metadata), detectron2's DatasetCatalog habits.

A record is a dict in detectron2's convention: ``{"file_name", "sem_seg_file_name", "image_id"}`` plus optional
``"height"`` / ``"width"``. Paths may be files or ``demo://`` URIs (see :mod:`algm_d2.data.demo`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from fvcore.common.registry import Registry

from .builtin_meta import IGNORE_LABEL, Color, label_palette

logger = logging.getLogger(__name__)

DATASETS_ENV = "ALGM_DATASETS"


def dataset_root() -> str:
    """Folder holding the builtin datasets: ``$ALGM_DATASETS``, else ``./datasets`` (read at each call)."""
    return os.path.expanduser(os.environ.get(DATASETS_ENV, "./datasets"))


@dataclass(frozen=True)
class DatasetMetadata:
    """What evaluators and visualisers need to know about a semantic segmentation dataset."""

    stuff_classes: Tuple[str, ...]
    stuff_colors: Tuple[Color, ...] = ()
    ignore_label: int = IGNORE_LABEL
    evaluator_type: str = "sem_seg"

    def __post_init__(self) -> None:
        if not self.stuff_classes:
            raise ValueError("a dataset needs at least one class")
        if not self.stuff_colors:
            object.__setattr__(self, "stuff_colors", label_palette(len(self.stuff_classes)))
        if len(self.stuff_colors) != len(self.stuff_classes):
            raise ValueError(f"{len(self.stuff_colors)} colors given for {len(self.stuff_classes)} classes")
        if 0 <= self.ignore_label < len(self.stuff_classes):
            raise ValueError(f"ignore_label {self.ignore_label} collides with a class id (0..{self.num_classes - 1})")

    @property
    def num_classes(self) -> int:
        return len(self.stuff_classes)


@dataclass(frozen=True)
class RegisteredDataset:
    """A registry entry. ``loader()`` lists the records; registering the same loader/metadata again is a no-op, so
    loaders should compare by value (frozen dataclasses), not by identity."""

    name: str
    loader: Callable[[], List[Dict[str, Any]]]
    metadata: DatasetMetadata


class DatasetRegistry(Registry):
    """fvcore Registry of :class:`RegisteredDataset` by dataset name, with errors that list what is registered."""

    def register_dataset(self, name: str, loader: Callable[[], List[Dict[str, Any]]],
                         metadata: DatasetMetadata) -> RegisteredDataset:
        entry = RegisteredDataset(name=name, loader=loader, metadata=metadata)
        if name in self:
            if self.get(name) == entry:
                return entry
            raise ValueError(f"dataset {name!r} is already registered with a different loader or metadata")
        self._do_register(name, entry)
        return entry

    def get(self, name: str) -> RegisteredDataset:
        if name not in self:
            known = ", ".join(sorted(key for key, _ in self))
            raise KeyError(f"dataset {name!r} is not registered; registered datasets: {known}")
        return super().get(name)

    def __repr__(self) -> str:
        lines = [f"{name}: {entry.metadata.num_classes} classes, {entry.loader}" for name, entry in sorted(self)]
        return "Registry of DATASET:\n" + "\n".join(lines)

    __str__ = __repr__


DATASET_REGISTRY = DatasetRegistry("DATASET")
DATASET_REGISTRY.__doc__ = "Semantic segmentation datasets by name. Keys: DATASETS.TRAIN, DATASETS.TEST."


def register_dataset(name: str, loader: Callable[[], List[Dict[str, Any]]],
                     metadata: DatasetMetadata) -> RegisteredDataset:
    """Register ``name``; idempotent for an equal (loader, metadata), ValueError for a different one."""
    return DATASET_REGISTRY.register_dataset(name, loader, metadata)


def get_metadata(name: str) -> DatasetMetadata:
    return DATASET_REGISTRY.get(name).metadata


def get_dataset_dicts(name: str) -> List[Dict[str, Any]]:
    """The records of dataset ``name`` (lists the files now, so missing folders raise here)."""
    records = DATASET_REGISTRY.get(name).loader()
    if not records:
        raise ValueError(f"dataset {name!r} has no records")
    logger.info("dataset %s: %d records", name, len(records))
    return records
