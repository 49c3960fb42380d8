"""Mistakes in files and configs give errors that name the file, key or value, early: config files and their
_BASE_ chains, variant.yml, ViT sizes, pixel statistics, enumerated keys and periods (before training), truncated
safetensors, oversized label maps, checkpoint pointers, a full disk."""
from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from PIL import Image

from algm_d2.checkpoint import UnreadableCheckpointError, build_from_variant, read_pretrained
from algm_d2.config import get_cfg
from algm_d2.data import BadSampleError
from algm_d2.data.readers import read_sem_seg
from algm_d2.engine import IncompleteCheckpointError, last_checkpoint
from algm_d2.engine.training_checkpoints import atomic_write
from algm_d2.engine.defaults import check_config
from algm_d2.modeling import SegmentationModel
from algm_d2.modeling.backbone.build import build_timm_vit

from .modeling.test_segmenter import variant


def test_config_files_with_a_base_cycle_or_no_mapping_are_named(tmp_path):
    (tmp_path / "self.yaml").write_text("_BASE_: self.yaml\n")
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: [a.yaml]\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- SOLVER\n- 1\n")
    (tmp_path / "child.yaml").write_text("_BASE_: missing.yaml\n")
    cases = {"self.yaml": r"_BASE_ cycle: .*self.yaml -> .*self.yaml",
             "a.yaml": r"_BASE_ cycle: .*a.yaml -> .*b.yaml -> .*a.yaml",
             "empty.yaml": r"empty.yaml is empty",
             "list.yaml": r"list.yaml is a YAML list",
             "child.yaml": r"missing.yaml \(the _BASE_ of .*child.yaml\): no such file"}
    for name, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            get_cfg().merge_from_file(str(tmp_path / name))
    (tmp_path / "ok.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.5\n")
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 7\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(tmp_path / "ok.yaml"))
    assert cfg.SOLVER.BASE_LR == 0.5 and cfg.SOLVER.MAX_ITER == 7


@pytest.mark.parametrize("field, value, message", [
    ("patch_size", 0, r"net_kwargs.patch_size must be a positive integer, got 0"),
    ("n_layers", None, r"net_kwargs has no n_layers"),
    ("n_heads", 5, r"net_kwargs.d_model \(64\) must be divisible by variant.yml: net_kwargs.n_heads \(5\)"),
    ("image_size", 512.5, r"net_kwargs.image_size must be a positive integer, got 512.5"),
])
def test_bad_variant_yml_values_are_named(field, value, message):
    bad = variant()
    if value is None:
        del bad["net_kwargs"][field]
    else:
        bad["net_kwargs"][field] = value
    with pytest.raises(ValueError, match=message):
        build_from_variant(bad)


@pytest.mark.parametrize("key, value, message", [
    ("PATCH_SIZE", 0, "MODEL.BACKBONE.PATCH_SIZE must be a positive integer, got 0"),
    ("NUM_HEADS", 5, r"MODEL.BACKBONE.EMBED_DIM \(384\) must be divisible by MODEL.BACKBONE.NUM_HEADS \(5\)"),
])
def test_bad_backbone_sizes_are_named(key, value, message):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE[key] = value
    with pytest.raises(ValueError, match=message):
        build_timm_vit(cfg)


def test_pixel_statistics_of_the_wrong_length_are_named():
    with pytest.raises(ValueError, match=r"MODEL.PIXEL_MEAN must have 3 values \(R, G, B\), got \[1.0, 2.0\]"):
        SegmentationModel(net=torch.nn.Identity(), pixel_mean=[1.0, 2.0], pixel_std=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"MODEL.PIXEL_STD must be > 0"):
        SegmentationModel(net=torch.nn.Identity(), pixel_mean=[1.0, 2.0, 3.0], pixel_std=[1.0, 0.0, 1.0])


@pytest.mark.parametrize("key, value, message", [
    ("TEST.PRECISION", "bf61", r"TEST.PRECISION must be one of fp32, bf16, fp16, got 'bf61'"),
    ("TEST.FLOPS_BACKEND", "fvcor", r"TEST.FLOPS_BACKEND must be one of fvcore, torch, got 'fvcor'"),
    ("MODEL.BACKBONE.POS_EMBED_INTERP", "bicubik", r"POS_EMBED_INTERP must be one of bilinear, bicubic"),
    ("TEST.MODE", "slid", r"TEST.MODE must be one of whole, slide"),
    ("TEST.SCALES", [], r"TEST.SCALES must be a non-empty list of positive numbers, got \[\]"),
    ("TEST.SCALES", [1.0, -0.5], r"TEST.SCALES must be a non-empty list of positive numbers"),
    ("SOLVER.CHECKPOINT_PERIOD", 0, r"SOLVER.CHECKPOINT_PERIOD must be > 0, got 0"),
    ("SOLVER.LOG_PERIOD", 0, r"SOLVER.LOG_PERIOD must be > 0, got 0"),
])
def test_keys_read_late_are_checked_when_the_config_is_built(key, value, message):
    cfg = get_cfg()
    check_config(cfg)  # the defaults pass
    section, *rest = key.split(".")
    node = cfg[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = value
    with pytest.raises(ValueError, match=message):
        check_config(cfg)


def test_truncated_or_garbage_safetensors_are_named(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(6.0)}, str(good))
    truncated, garbage = tmp_path / "truncated.safetensors", tmp_path / "garbage.safetensors"
    truncated.write_bytes(good.read_bytes()[:20])
    garbage.write_bytes(b"garbage" * 20)
    for path in (truncated, garbage):
        with pytest.raises(UnreadableCheckpointError, match=rf"MODEL.BACKBONE.PRETRAINED {path} .* is truncated"):
            read_pretrained(path)
    assert torch.equal(read_pretrained(good)["w"], torch.arange(6.0))


def test_a_label_map_over_pillows_pixel_limit_is_a_bad_sample_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x 100: Pillow's bomb error
    with pytest.raises(BadSampleError, match=rf"label map too large to decode .*{path}"):
        read_sem_seg(str(path))


@pytest.mark.parametrize("tag", ["", "../../elsewhere", "/tmp", "iter_12x"])
def test_a_pointer_that_names_no_checkpoint_folder_is_refused(tmp_path, tag):
    (tmp_path / "last_checkpoint").write_text(tag)
    with pytest.raises(IncompleteCheckpointError, match=r"last_checkpoint must name a checkpoint folder"):
        last_checkpoint(tmp_path)


def test_a_full_disk_is_named_with_the_free_space(tmp_path):
    def write(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "model.pth"
    with pytest.raises(OSError, match=rf"no space left while writing {target} \(\d+\.\d MiB free"):
        atomic_write(target, write)
    assert not (tmp_path / "model.pth.tmp").exists()
