"""Checkpoints are data, never code, and a damaged one is named: resume loads DeepSpeed's and the trainer's files
with ``weights_only=True`` and an allow-list, manifest checksums are verified, and the unsafe loader is never
suggested for a damaged file."""
from __future__ import annotations

import builtins
import logging
import json

import pytest
import torch

from algm_d2.checkpoint import UnreadableCheckpointError, UnsafeCheckpointError, load_checked, read_state_dict
from algm_d2.engine import IncompleteCheckpointError, eval_weights, lr_factor
from algm_d2.engine import training_checkpoints as checkpoint_module

from ..engine.test_engine_trainer import StandInTrainer, make_cfg, process_group  # noqa: F401 - the fixture is used


class WritesAFile:
    """Unpickling it opens (creates) ``path``: a stand-in for any code a hostile checkpoint carries."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def plant(path, marker, *, keep_manifest_true=True):
    """Replace the checkpoint file ``path`` with a hostile pickle; rewrite the manifest to match it (an attacker
    who can write the file can write the manifest too)."""
    torch.save({"module": WritesAFile(marker)}, path)
    if keep_manifest_true:
        manifest = json.loads((path.parent / checkpoint_module.MANIFEST).read_text())
        checkpoint_module.write_manifest(path.parent, manifest["iteration"])


@pytest.mark.parametrize("stage, precision, name", [
    (0, "fp32", "mp_rank_00_model_states.pt"),
    (2, "bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    (0, "fp32", "trainer_state_rank0.pt"),
])
def test_resume_refuses_code_in_any_checkpoint_file_and_names_it(tmp_path, stage, precision, name):
    out = tmp_path / "run"
    opts = ("SOLVER.MAX_ITER", "3", "DEEPSPEED.ZERO_STAGE", str(stage), "DEEPSPEED.PRECISION", precision)
    StandInTrainer(make_cfg(out, *opts)).train()
    marker = tmp_path / "code_ran"
    target = out / "checkpoints" / "iter_0000003" / name
    plant(target, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{target}.*io.open"):
        StandInTrainer(make_cfg(out, *opts), resume=True)
    assert not marker.exists()


def test_resume_of_zero_2_bf16_loads_with_the_allow_list(tmp_path):
    out = tmp_path / "run"
    opts = ("SOLVER.MAX_ITER", "3", "DEEPSPEED.ZERO_STAGE", "2", "DEEPSPEED.PRECISION", "bf16")
    StandInTrainer(make_cfg(out, *opts)).train()
    assert StandInTrainer(make_cfg(out, *opts), resume=True).start_iter == 3


def test_model_weights_refuse_code_and_damage_without_suggesting_the_unsafe_loader(tmp_path):
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": WritesAFile(marker)}, hostile)
    with pytest.raises(UnsafeCheckpointError, match=rf"{hostile}.*io.open"):
        read_state_dict(hostile)
    assert not marker.exists()
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.arange(4.0)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 8)
    for path, message in ((truncated, "truncated or damaged"), (empty, r"empty \(0 bytes\)"),
                          (garbage, "damaged")):
        with pytest.raises(UnreadableCheckpointError, match=rf"{path}.*{message}") as error:
            read_state_dict(path)
        assert "weights_only" not in str(error.value)
    assert torch.equal(load_checked(good)["model"]["w"], torch.arange(4.0))


def flip_bytes(path, offset, count=64):
    """Same-size damage: ``count`` bytes from ``offset`` inverted."""
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(255 - b for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "model.pth", "trainer_state_rank0.pt"])
def test_resume_names_a_same_size_damaged_file(tmp_path, name):
    out = tmp_path / "run"
    opts = ("SOLVER.MAX_ITER", "3")
    StandInTrainer(make_cfg(out, *opts)).train()
    target = out / "checkpoints" / "iter_0000003" / name
    flip_bytes(target, target.stat().st_size // 2)
    with pytest.raises(UnreadableCheckpointError, match=rf"{target} is damaged: its SHA-256 differs"):
        StandInTrainer(make_cfg(out, *opts), resume=True)


def test_model_weights_of_our_checkpoints_are_checked_against_their_manifest(tmp_path):
    out = tmp_path / "run"
    StandInTrainer(make_cfg(out, "SOLVER.MAX_ITER", "3")).train()
    checkpoint_weights = out / "checkpoints" / "iter_0000003" / "model.pth"
    final_weights = out / "model_final.pth"
    assert eval_weights(make_cfg(out)) == checkpoint_weights  # intact: accepted
    assert eval_weights(make_cfg(out, "MODEL.WEIGHTS", str(final_weights))) == final_weights
    for path, cfg in ((checkpoint_weights, make_cfg(out)),
                      (final_weights, make_cfg(out, "MODEL.WEIGHTS", str(final_weights)))):
        flip_bytes(path, path.stat().st_size // 2)
        with pytest.raises(UnreadableCheckpointError, match=rf"{path} is damaged"):
            eval_weights(cfg)
    with pytest.raises(UnreadableCheckpointError, match=rf"{final_weights} is damaged"):
        StandInTrainer(make_cfg(tmp_path / "fine_tune", "MODEL.WEIGHTS", str(final_weights)))


def test_a_garbage_manifest_is_named(tmp_path):
    out = tmp_path / "run"
    StandInTrainer(make_cfg(out, "SOLVER.MAX_ITER", "3")).train()
    manifest = out / "checkpoints" / "iter_0000003" / checkpoint_module.MANIFEST
    manifest.write_bytes(b"\x00garbage")
    with pytest.raises(IncompleteCheckpointError, match=rf"{manifest} is damaged"):
        StandInTrainer(make_cfg(out, "SOLVER.MAX_ITER", "3"), resume=True)


def test_resume_applies_a_changed_base_lr_and_says_so(tmp_path, caplog):
    """The advice after a non-finite loss ("--resume with a lower SOLVER.BASE_LR") must do what it says."""
    out = tmp_path / "run"
    StandInTrainer(make_cfg(out, "SOLVER.MAX_ITER", "3")).train()
    with caplog.at_level(logging.WARNING):
        trainer = StandInTrainer(make_cfg(out, "SOLVER.BASE_LR", "0.001"), resume=True)
    assert "initial_lr 0.01 -> 0.001" in caplog.text and "apply from iteration 4" in caplog.text
    trainer.train()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    lrs = {r["iteration"]: r["lr"] for r in records if "lr" in r}
    # make_cfg: poly schedule over 6 iterations, power 0.9, 2 warmup iterations; steps 4..6 are 0-based 3..5
    for step in (4, 5, 6):
        expected = 0.001 * lr_factor(step - 1, max_iter=6, schedule="poly", base_lr=0.001, power=0.9,
                                     warmup_iters=2, warmup_factor=0.001)
        assert lrs[step] == pytest.approx(expected, rel=1e-12)
    assert lrs[3] == pytest.approx(0.01 * lr_factor(2, max_iter=3, schedule="poly", base_lr=0.01, power=0.9,
                                                    warmup_iters=2, warmup_factor=0.001), rel=1e-12)
