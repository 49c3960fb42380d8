"""Data loaders: an infinite, resumable, rank-sharded training loader and a sharded inference loader.

Both yield lists of mapped dicts (detectron2's ``trivial_batch_collator``). Batches are formed inside the dataset
and handed to workers whole (worker ``w`` of ``N`` makes batches ``w, w + N, ...``), so training batch ``k`` is the
same whatever the number of workers and whether the run started at 0 or resumed at ``k``.
"""
from __future__ import annotations

import itertools
import logging
import pickle
import random
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .catalog import get_dataset_dicts
from .folders import register_datasets_from_config
from .mapper import SemSegDatasetMapper, common_metadata
from .readers import BadSampleError
from .samplers import InferenceSampler, TrainingSampler, resolve_rank

logger = logging.getLogger(__name__)

Mapper = Callable[[Dict[str, Any], np.random.Generator], Optional[Dict[str, Any]]]
# Errors of one sample that DATALOADER.SKIP_BAD_SAMPLES turns into skips; anything else is a bug and propagates.
SAMPLE_ERRORS = (BadSampleError, FileNotFoundError)
# A training slot gives up after this many unreadable samples in a row (the data is broken, not a few files).
MAX_SAMPLE_ATTEMPTS = 100


def trivial_batch_collator(batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Batches stay lists of dicts (images of different sizes)."""
    return batch


class SerializedRecords:
    """Records pickled into one numpy buffer: forked workers would otherwise touch (and so copy) every Python
    object of a large list through reference counting (detectron2's NumpySerializedList)."""

    def __init__(self, records: Sequence[Dict[str, Any]]) -> None:
        blobs = [np.frombuffer(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
                 for record in records]
        self._ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self._buffer = np.concatenate(blobs) if blobs else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self._buffer[start:int(self._ends[index])]))


class SkipCounter:
    """Samples skipped as unreadable, counted in shared memory with one slot per worker (no lock needed) so the
    main process sees the workers' counts."""

    def __init__(self, num_slots: int) -> None:
        self._counts = torch.zeros(max(num_slots, 1), dtype=torch.int64).share_memory_()

    def add(self, slot: int) -> int:
        """Count one skip in ``slot``; returns that slot's count."""
        self._counts[slot] += 1
        return int(self._counts[slot])

    @property
    def total(self) -> int:
        return int(self._counts.sum())


def _worker() -> Tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def seed_worker(worker_id: int, *, seed: int, rank: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python, NumPy and torch from ``(seed, rank, worker_id)`` for mappers
    that use the global generators (ours take the generator they are given)."""
    state = np.random.SeedSequence([seed, rank, worker_id]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[0]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


class _MappedBatches(IterableDataset):
    """Shared part of the two loaders: map a record, or skip it (counted, with a warning) when it is unreadable
    and ``skip_bad_samples`` is on. A mapper may also return None to drop a record on purpose (detectron2's
    convention); that is neither an error nor counted."""

    def __init__(self, records: Sequence[Dict[str, Any]], mapper: Mapper, *, batch_size: int, seed: int,
                 skip_bad_samples: bool, num_workers: int) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be > 0, got {batch_size}")
        self.records = SerializedRecords(records)
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = seed
        self.skip_bad_samples = skip_bad_samples
        self.skip_counter = SkipCounter(num_workers)

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far by all workers of this loader."""
        return self.skip_counter.total

    def _map(self, index: int, rng: np.random.Generator) -> Optional[Dict[str, Any]]:
        try:
            sample = self.mapper(self.records[index], rng)
            image = sample.get("image") if sample is not None else None
            if isinstance(image, torch.Tensor) and image.is_floating_point():  # uint8 images cannot be non-finite
                from ..modeling.inputs import check_finite_image  # noqa: PLC0415 - keeps timm out of algm_d2.data

                check_finite_image(image, sample.get("file_name", f"record {index}"), BadSampleError)
            return sample
        except SAMPLE_ERRORS as error:
            if not self.skip_bad_samples:
                raise
            worker_id, _ = _worker()
            count = self.skip_counter.add(worker_id)
            logger.warning("skipping an unreadable sample (DATALOADER.SKIP_BAD_SAMPLES; %d skipped by this worker): "
                           "%s", count, error)
            return None


class TrainBatches(_MappedBatches):
    """Infinite training batches of this rank, from batch ``start_iter`` on. Slot ``j`` of batch ``k`` maps stream
    position ``k * batch_size + j`` with a generator seeded by ``(seed, global position, attempt)``; a skipped
    sample is replaced by a random one drawn from that generator."""

    def __init__(self, records: Sequence[Dict[str, Any]], mapper: Mapper, sampler: TrainingSampler, *,
                 batch_size: int, start_iter: int, seed: int, skip_bad_samples: bool, num_workers: int) -> None:
        super().__init__(records, mapper, batch_size=batch_size, seed=seed, skip_bad_samples=skip_bad_samples,
                         num_workers=num_workers)
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.sampler = sampler
        self.start_iter = start_iter

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        worker_id, num_workers = _worker()
        for batch_index in itertools.count(self.start_iter + worker_id, num_workers):
            yield [self._sample(batch_index * self.batch_size + slot) for slot in range(self.batch_size)]

    def _sample(self, position: int) -> Dict[str, Any]:
        global_position = self.sampler.global_position(position)
        index = self.sampler[position]
        for attempt in range(MAX_SAMPLE_ATTEMPTS):
            rng = np.random.default_rng([self.seed, global_position, attempt])
            if attempt:
                index = int(rng.integers(len(self.records)))
            sample = self._map(index, rng)
            if sample is not None:
                return sample
        raise RuntimeError(f"{MAX_SAMPLE_ATTEMPTS} training samples in a row were unreadable or dropped by the "
                           "mapper; see the warnings")


class InferenceBatches(_MappedBatches):
    """This rank's share of a dataset (InferenceSampler), in order, once; skipped samples leave shorter batches
    (empty ones are dropped)."""

    def __init__(self, records: Sequence[Dict[str, Any]], mapper: Mapper, sampler: InferenceSampler, *,
                 batch_size: int, seed: int, skip_bad_samples: bool, num_workers: int) -> None:
        super().__init__(records, mapper, batch_size=batch_size, seed=seed, skip_bad_samples=skip_bad_samples,
                         num_workers=num_workers)
        indices = list(sampler)
        self.batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        worker_id, num_workers = _worker()
        for batch in self.batches[worker_id::num_workers]:
            samples = [self._map(index, np.random.default_rng([self.seed, index])) for index in batch]
            samples = [sample for sample in samples if sample is not None]
            if samples:
                yield samples


def resolve_seed(seed: int) -> int:
    """``seed`` when >= 0; else a random one, the same on every rank (broadcast from rank 0)."""
    if seed >= 0:
        return seed
    drawn = [int(np.random.SeedSequence().generate_state(1)[0]) >> 1]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(drawn, src=0)
    logger.info("SEED < 0: the data order uses seed %d", drawn[0])
    return drawn[0]


def _check_against_model(cfg, dataset_names: Sequence[str]) -> None:  # noqa: ANN001 - a CfgNode
    metadata = common_metadata(dataset_names)
    head = cfg.MODEL.SEM_SEG_HEAD
    if metadata.num_classes != head.NUM_CLASSES:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {head.NUM_CLASSES} but {', '.join(dataset_names)} "
                         f"has {metadata.num_classes} classes")
    if metadata.ignore_label != head.IGNORE_VALUE:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE is {head.IGNORE_VALUE} but {', '.join(dataset_names)} "
                         f"ignores label {metadata.ignore_label}")


def _data_loader(dataset: _MappedBatches, *, num_workers: int, seed: int, rank: int, pin_memory: bool) -> DataLoader:
    # pinned batches let the model's non-blocking copies to the GPU overlap the previous batch's work
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=trivial_batch_collator,
                      worker_init_fn=partial(seed_worker, seed=seed, rank=rank), pin_memory=pin_memory,
                      prefetch_factor=2 if num_workers > 0 else None)


def _pins_memory(cfg) -> bool:  # noqa: ANN001 - a CfgNode
    """Whether batches go to a CUDA device (MODEL.DEVICE) that exists: then they are pinned."""
    return str(cfg.MODEL.DEVICE).startswith("cuda") and torch.cuda.is_available()


def build_train_loader(cfg, mapper: Optional[Mapper] = None, *,  # noqa: ANN001 - a CfgNode
                       total_batch_size: int, start_iter: int = 0, rank: Optional[int] = None,
                       world_size: Optional[int] = None, num_workers: Optional[int] = None,
                       seed: Optional[int] = None) -> DataLoader:
    """Infinite loader of this rank's training batches (lists of ``total_batch_size / world_size`` dicts).

    Args:
        cfg: DATASETS.TRAIN (concatenated), DATALOADER.*, INPUT.* (default mapper), SEED.
        mapper: ``mapper(record, rng) -> dict``; default ``SemSegDatasetMapper.from_config(cfg, is_train=True)``.
        total_batch_size: images per iteration over all ranks (the engine passes SOLVER.IMS_PER_BATCH).
        start_iter: first iteration to produce; batches are those a run started at 0 would produce from there.
        rank, world_size: default torch.distributed's (or 0 and 1).
        num_workers, seed: default DATALOADER.NUM_WORKERS and SEED (< 0: random, shared by the ranks).
    """
    register_datasets_from_config(cfg)
    names = tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: name at least one registered dataset")
    rank, world_size = resolve_rank(rank, world_size)
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(f"total batch size (SOLVER.IMS_PER_BATCH) {total_batch_size} must be a positive multiple "
                         f"of the number of processes {world_size}")
    _check_against_model(cfg, names)
    records = [record for name in names for record in get_dataset_dicts(name)]
    seed = resolve_seed(cfg.SEED if seed is None else seed)
    num_workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    dataset = TrainBatches(
        records, mapper if mapper is not None else SemSegDatasetMapper.from_config(cfg, is_train=True),
        TrainingSampler(len(records), seed=seed, rank=rank, world_size=world_size),
        batch_size=total_batch_size // world_size, start_iter=start_iter, seed=seed,
        skip_bad_samples=cfg.DATALOADER.SKIP_BAD_SAMPLES, num_workers=num_workers)
    logger.info("training data: %s, %d records, %d images per rank per iteration from iteration %d",
                ", ".join(names), len(records), dataset.batch_size, start_iter)
    return _data_loader(dataset, num_workers=num_workers, seed=seed, rank=rank, pin_memory=_pins_memory(cfg))


def build_test_loader(cfg, dataset_name: str, mapper: Optional[Mapper] = None, *,  # noqa: ANN001 - a CfgNode
                      batch_size: int = 1, rank: Optional[int] = None, world_size: Optional[int] = None,
                      num_workers: Optional[int] = None) -> DataLoader:
    """Loader of this rank's contiguous share of ``dataset_name`` (every record on exactly one rank), in order.

    ``mapper`` defaults to ``SemSegDatasetMapper.from_config(cfg, is_train=False, dataset_names=[dataset_name])``;
    ``len(loader)`` is the number of batches of this rank.
    """
    register_datasets_from_config(cfg)
    _check_against_model(cfg, [dataset_name])
    rank, world_size = resolve_rank(rank, world_size)
    records = get_dataset_dicts(dataset_name)
    if cfg.DATASETS.TEST_MAX_IMAGES < 0:
        raise ValueError(f"DATASETS.TEST_MAX_IMAGES must be >= 0 (0 = all images), got {cfg.DATASETS.TEST_MAX_IMAGES}")
    if 0 < cfg.DATASETS.TEST_MAX_IMAGES < len(records):
        logger.info("%s: evaluating the first %d of %d images (DATASETS.TEST_MAX_IMAGES)", dataset_name,
                    cfg.DATASETS.TEST_MAX_IMAGES, len(records))
        records = records[: cfg.DATASETS.TEST_MAX_IMAGES]
    seed = resolve_seed(cfg.SEED)
    num_workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    if mapper is None:
        mapper = SemSegDatasetMapper.from_config(cfg, is_train=False, dataset_names=[dataset_name])
    dataset = InferenceBatches(
        records, mapper, InferenceSampler(len(records), rank=rank, world_size=world_size), batch_size=batch_size,
        seed=seed, skip_bad_samples=cfg.DATALOADER.SKIP_BAD_SAMPLES, num_workers=num_workers)
    return _data_loader(dataset, num_workers=num_workers, seed=seed, rank=rank, pin_memory=_pins_memory(cfg))
