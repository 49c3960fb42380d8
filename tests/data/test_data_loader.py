"""Samplers and loaders: seeded shards, resumption, worker independence, inference sharding, skip mode."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from algm_d2.data import (BadSampleError, DemoShapes, InferenceSampler, SerializedRecords, TrainingSampler,
                          build_test_loader, build_train_loader, get_metadata, register_custom_sem_seg,
                          register_dataset, seed_worker)

from .test_data_helpers import demo_cfg, make_pairs, unique_name

DEMO_SMALL = "demo_shapes_loader_test"


@pytest.fixture(scope="module")
def cfg():
    register_dataset(DEMO_SMALL, DemoShapes(split="train", num_images=10, image_size=32),
                     get_metadata("demo_shapes_train"))
    return demo_cfg(train=(DEMO_SMALL,), test=(DEMO_SMALL,), crop=24)


def _take(loader, count):
    return list(itertools.islice(iter(loader), count))


def _same_batches(a, b):
    assert [[s["file_name"] for s in batch] for batch in a] == [[s["file_name"] for s in batch] for batch in b]
    for batch_a, batch_b in zip(a, b):
        for sample_a, sample_b in zip(batch_a, batch_b):
            assert torch.equal(sample_a["image"], sample_b["image"])
            assert torch.equal(sample_a["sem_seg"], sample_b["sem_seg"])


def test_training_sampler_shards_each_epoch():
    size, world = 10, 3
    samplers = [TrainingSampler(size, seed=4, rank=r, world_size=world) for r in range(world)]
    streams = [[s[p] for p in range(12)] for s in samplers]  # 36 global positions: 3.6 epochs
    merged = [streams[p % world][p // world] for p in range(36)]  # global position p = local * world + rank
    for epoch in range(3):
        assert sorted(merged[epoch * size:(epoch + 1) * size]) == list(range(size))
    assert merged[:size] != merged[size:2 * size]  # a new permutation each epoch
    assert merged[:size] != list(range(size))
    again = TrainingSampler(size, seed=4, rank=1, world_size=world)
    assert [again[p] for p in (11, 3, 7)] == [streams[1][11], streams[1][3], streams[1][7]]  # random access
    assert list(itertools.islice(iter(again), 12)) == streams[1]
    other_seed = TrainingSampler(size, seed=5, rank=1, world_size=world)
    assert [other_seed[p] for p in range(12)] != streams[1]


@pytest.mark.parametrize("size", [0, 1, 7, 12])
def test_inference_sampler_splits_without_duplicates(size):
    for world in (1, 2, 3, 5):
        shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
        assert sum(shards, []) == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        InferenceSampler(5, rank=2, world_size=2)


def test_train_loader_resumes_exactly(cfg):
    from_start = _take(build_train_loader(cfg, total_batch_size=3), 6)  # 18 samples: crosses an epoch
    resumed = _take(build_train_loader(cfg, total_batch_size=3, start_iter=4), 2)
    _same_batches(from_start[4:], resumed)
    assert all(len(batch) == 3 and batch[0]["image"].shape == (3, 24, 24) for batch in from_start)
    reseeded = _take(build_train_loader(cfg, total_batch_size=3, seed=1), 2)
    names = [[s["file_name"] for s in batch] for batch in reseeded]
    assert names != [[s["file_name"] for s in batch] for batch in from_start[:2]]


def test_train_loader_does_not_depend_on_workers(cfg):
    in_process = _take(build_train_loader(cfg, total_batch_size=2, start_iter=1), 3)
    with_workers = _take(build_train_loader(cfg, total_batch_size=2, start_iter=1, num_workers=2), 3)
    _same_batches(in_process, with_workers)


def test_train_loader_ranks_read_disjoint_samples(cfg):
    # 10 images, 2 ranks x 2 images per iteration: the first 2 iterations cover 8 different images
    per_rank = [_take(build_train_loader(cfg, total_batch_size=4, rank=r, world_size=2), 2) for r in range(2)]
    names = [s["image_id"] for batches in per_rank for batch in batches for s in batch]
    assert len(names) == 8 and len(set(names)) == 8
    with pytest.raises(ValueError, match="IMS_PER_BATCH.* 5 .* 2"):
        build_train_loader(cfg, total_batch_size=5, rank=0, world_size=2)


def test_test_loader_shards_across_ranks(cfg):
    shards = [build_test_loader(cfg, DEMO_SMALL, rank=r, world_size=3) for r in range(3)]
    ids = [[s["image_id"] for batch in loader for s in batch] for loader in shards]
    assert sum(ids, []) == [f"train/{i:05d}" for i in range(10)]
    assert [len(loader) for loader in shards] == [4, 3, 3]
    batch = next(iter(shards[0]))
    assert len(batch) == 1 and batch[0]["sem_seg"].shape == (32, 32) and batch[0]["image"].shape == (3, 24, 24)
    batched = build_test_loader(cfg, DEMO_SMALL, batch_size=4, num_workers=2)
    assert len(batched) == 3
    assert sorted(s["image_id"] for batch in batched for s in batch) == [f"train/{i:05d}" for i in range(10)]


@pytest.fixture
def broken_dataset(tmp_path):
    """4 images, the third one corrupt."""
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    make_pairs(tmp_path / "img", tmp_path / "ann", ["s0", "s1", "s2", "s3"], num_classes=3, size=(20, 20))
    (tmp_path / "img" / "s2.jpg").write_bytes(b"not a jpeg")
    name = unique_name(tmp_path, "broken")
    register_custom_sem_seg(name, str(tmp_path / "img"), str(tmp_path / "ann"), str(tmp_path / "classes.txt"))
    cfg = demo_cfg(train=(name,), test=(name,), crop=16)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    return cfg, name


def test_bad_sample_stops_the_loader_by_default(broken_dataset):
    cfg, name = broken_dataset
    with pytest.raises(BadSampleError, match="s2.jpg"):
        list(build_test_loader(cfg, name))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_mode_counts_skips(broken_dataset, num_workers, caplog):
    cfg, name = broken_dataset
    cfg.DATALOADER.SKIP_BAD_SAMPLES = True
    loader = build_test_loader(cfg, name, num_workers=num_workers)
    assert [s["image_id"] for batch in loader for s in batch] == ["s0", "s1", "s3"]
    assert loader.dataset.num_skipped == 1
    if num_workers == 0:
        assert "s2.jpg" in caplog.text and "skipping" in caplog.text


def test_skip_mode_in_training_keeps_batches_full(broken_dataset):
    cfg, _ = broken_dataset
    cfg.DATALOADER.SKIP_BAD_SAMPLES = True
    loader = build_train_loader(cfg, total_batch_size=4)
    batches = _take(loader, 3)  # 12 samples of a 4-image dataset: the corrupt one comes up 3 times
    assert all(len(batch) == 4 for batch in batches)
    assert all(s["image_id"] != "s2" for batch in batches for s in batch)
    assert loader.dataset.num_skipped >= 3  # once per epoch, plus any replacement that drew it again


def test_serialized_records_round_trip():
    records = [{"file_name": f"f{i}", "image_id": i, "nested": {"k": [i] * i}} for i in range(5)]
    serialized = SerializedRecords(records)
    assert len(serialized) == 5 and [serialized[i] for i in range(5)] == records


def test_seed_worker_depends_on_rank_and_worker():
    draws = {}
    for rank, worker in [(0, 0), (0, 1), (1, 0), (0, 0)]:
        seed_worker(worker, seed=7, rank=rank)
        draws.setdefault((rank, worker), []).append((np.random.rand(), torch.rand(1).item()))
    assert draws[(0, 0)][0] == draws[(0, 0)][1]
    assert len({d[0] for d in draws.values()}) == 3
