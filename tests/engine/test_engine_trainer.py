"""The DeepSpeed trainer in this process (gloo, world size 1) on a stand-in model that follows the detectron2 contract
of algm_d2.modeling (list of dicts in; loss dict in training, per-image class probabilities in eval; merge_stats),
on the procedural demo data: ZeRO 0/2 x fp32/bf16, exact resume, kills during checkpoint writes, non-finite losses,
kept checkpoints, periodic evaluation."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from algm_d2.checkpoint import load_model_weights
from algm_d2.config import get_cfg
from algm_d2.engine import IncompleteCheckpointError, Trainer, eval_weights, last_checkpoint, verify_checkpoint
from algm_d2.engine import training_checkpoints as checkpoint_module
from algm_d2.engine.defaults import seed_everything
from algm_d2.engine.launch import find_free_port, init_distributed

ROOT = Path(__file__).resolve().parents[2]


class StandInSegmentor(nn.Module):
    """A tiny conv net with the parameter layout the engine relies on (net.backbone.{patch_embed, pos_embed,
    blocks.<i>}, net.decoder) and dropout, so that resuming must restore the RNG to match. ``nan_at_call``: the
    training forward with that 1-based number returns a NaN loss."""

    def __init__(self, num_classes: int = 6, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.backbone = nn.Module()
        self.net.backbone.patch_embed = nn.Conv2d(3, width, 8, stride=8)
        self.net.backbone.pos_embed = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.net.backbone.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU(), nn.Dropout(0.2))
            for _ in range(depth))
        self.net.decoder = nn.Conv2d(width, num_classes, 1)
        self.training_calls = 0
        self.nan_at_call = 0
        self._tokens = (0, 0)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net.backbone.patch_embed(images) + self.net.backbone.pos_embed
        for block in self.net.backbone.blocks:
            x = x + block(x)
        self._tokens = (x.shape[-2] * x.shape[-1], images.shape[0])
        return F.interpolate(self.net.decoder(x), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, batched_inputs):
        dtype = self.net.decoder.weight.dtype
        images = torch.stack([x["image"] for x in batched_inputs]).to(dtype) / 255.0 - 0.5
        if self.training:
            self.training_calls += 1
            targets = torch.stack([x["sem_seg"] for x in batched_inputs]).long()
            loss = F.cross_entropy(self._logits(images).float(), targets, ignore_index=255)
            if self.training_calls == self.nan_at_call:
                loss = loss * float("nan")
            return {"loss_sem_seg": loss}
        logits = self._logits(images).float()
        return [{"sem_seg": F.interpolate(logit[None], size=(x["height"], x["width"]), mode="bilinear",
                                          align_corners=False)[0].softmax(0)}
                for logit, x in zip(logits, batched_inputs)]

    @property
    def merge_stats(self):
        tokens, images = self._tokens
        return {"tokens_per_layer": [[tokens] * images for _ in self.net.backbone.blocks], "initial_tokens": tokens,
                "num_prefix": 0}


class StandInTrainer(Trainer):
    def __init__(self, cfg, *, resume=False):
        seed_everything(cfg.SEED)  # what train_net's setup() does
        super().__init__(cfg, resume=resume)

    @classmethod
    def build_model(cls, cfg):
        return StandInSegmentor(num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)


class StopRun(Exception):
    """Stands for the process being killed."""


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """A one-process gloo group for DeepSpeed, torn down (with the environment it set) after the module that uses
    it; DeepSpeed's cached clone of the world group goes with it, so that a later module's group gets a new one."""
    from deepspeed.utils import groups

    saved = dict(os.environ)
    init_distributed({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(find_free_port())}, "gloo")
    yield
    dist.destroy_process_group()
    groups._WORLD_GROUP = None
    os.environ.clear()
    os.environ.update(saved)


def make_cfg(output_dir: Path, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs/demo/Base-Demo.yaml"))
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "6", "SOLVER.LOG_PERIOD", "1",
                         "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.BASE_LR", "0.01",
                         "SOLVER.MAX_CHECKPOINTS_TO_KEEP", "0", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
                         "TEST.COMPUTE_FLOPS", "False", "OUTPUT_DIR", str(output_dir), *opts])
    cfg.freeze()
    return cfg


def losses(output_dir: Path) -> dict:
    """iteration -> total_loss from metrics.json (later lines win, as after a resume)."""
    records = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    return {r["iteration"]: r["total_loss"] for r in records if "total_loss" in r}


def final_weights(output_dir: Path) -> dict:
    return torch.load(output_dir / "model_final.pth", weights_only=True)["model"]


def pointer(output_dir: Path) -> str:
    return (output_dir / "checkpoints" / "last_checkpoint").read_text()


def train_stopping_after_save(cfg, stop_at: int, *, resume: bool = False) -> None:
    """Train until the checkpoint of ``stop_at`` is written, then stop as if killed."""
    trainer = StandInTrainer(cfg, resume=resume)
    save = trainer.save_checkpoint

    def save_then_stop(step):
        save(step)
        if step == stop_at:
            raise StopRun

    trainer.save_checkpoint = save_then_stop
    with pytest.raises(StopRun):
        trainer.train()


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (0, "bf16"), (2, "fp32"), (2, "bf16")])
def test_zero_stages_and_precisions(tmp_path, stage, precision):
    out = tmp_path / "run"
    cfg = make_cfg(out, "SOLVER.MAX_ITER", "3", "DEEPSPEED.ZERO_STAGE", str(stage), "DEEPSPEED.PRECISION", precision,
                   "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5")
    trainer = StandInTrainer(cfg)
    initial = {k: v.detach().float().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.engine.zero_optimization_stage() == stage
    assert trainer.engine.bfloat16_enabled() == (precision == "bf16")
    assert sorted(losses(out)) == [1, 2, 3] and all(0 < v < 10 for v in losses(out).values())
    weights = final_weights(out)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert not torch.equal(weights["net.decoder.weight"], initial["net.decoder.weight"])
    if precision == "bf16":
        # model_final holds the float32 master weights, not the bf16 copies the forward used
        master = weights["net.decoder.weight"]
        assert not torch.equal(master, master.to(torch.bfloat16).float())
    assert pointer(out) == "iter_0000003"
    assert (out / "model_final.pth").read_bytes() == (out / "checkpoints/iter_0000003/model.pth").read_bytes()


def test_zero_2_takes_the_same_steps_as_zero_0(tmp_path):
    runs = {}
    for stage in (0, 2):
        cfg = make_cfg(tmp_path / str(stage), "SOLVER.MAX_ITER", "3", "DEEPSPEED.ZERO_STAGE", str(stage),
                       "SOLVER.OPTIMIZER", "AdamW", "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.LAYER_DECAY", "0.7")
        StandInTrainer(cfg).train()
        runs[stage] = final_weights(tmp_path / str(stage))
    for name in runs[0]:
        torch.testing.assert_close(runs[2][name], runs[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_zero_3_trains_evaluates_and_exports_full_weights(tmp_path, monkeypatch):
    """ZeRO-3 partitions the parameters: evaluation gathers them, model_final.pth holds them whole and equals a
    ZeRO-0 run; GFLOPs are skipped (ZeRO-3's hooks hide the linear layers from the FLOP counter)."""
    # DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear for the whole process; put it back for later tests
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    runs = {}
    for stage in (0, 3):
        out = tmp_path / str(stage)
        cfg = make_cfg(out, "SOLVER.MAX_ITER", "2", "DEEPSPEED.ZERO_STAGE", str(stage), "DATASETS.TEST",
                       "('demo_shapes_val',)", "TEST.COMPUTE_FLOPS", "True", "TEST.FLOPS_NUM_IMAGES", "1",
                       "TEST.FLOPS_BACKEND", "torch")
        runs[stage] = (StandInTrainer(cfg).train()["demo_shapes_val"], final_weights(out))
    (results0, weights0), (results3, weights3) = runs[0], runs[3]
    assert "flops" in results0 and "flops" not in results3
    assert results3["sem_seg"]["mIoU"] == pytest.approx(results0["sem_seg"]["mIoU"], abs=1e-4)
    for name in weights0:
        torch.testing.assert_close(weights3[name], weights0[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "bf16")])
def test_resume_continues_exactly(tmp_path, stage, precision):
    """6 iterations in one run == 3 iterations, a kill right after the checkpoint, then --resume for 3 more: the
    same per-iteration losses and bit-identical weights (dropout makes the RNG restore matter; accumulation of 2
    micro-batches makes the data position matter)."""
    opts = ["DEEPSPEED.ZERO_STAGE", str(stage), "DEEPSPEED.PRECISION", precision, "SOLVER.GRAD_ACCUM_STEPS", "2",
            "SOLVER.CHECKPOINT_PERIOD", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    StandInTrainer(make_cfg(straight, *opts)).train()
    train_stopping_after_save(make_cfg(resumed, *opts), 3)
    assert pointer(resumed) == "iter_0000003" and sorted(losses(resumed)) == [1, 2, 3]
    trainer = StandInTrainer(make_cfg(resumed, *opts), resume=True)
    assert trainer.start_iter == 3 and trainer.data_position == 6
    trainer.train()
    assert losses(resumed) == losses(straight)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_batch_layout(tmp_path):
    out = tmp_path / "run"
    train_stopping_after_save(make_cfg(out), 3)
    with pytest.raises(ValueError, match=r"SOLVER.GRAD_ACCUM_STEPS 1 -> 2"):
        StandInTrainer(make_cfg(out, "SOLVER.GRAD_ACCUM_STEPS", "2"), resume=True)


@pytest.mark.parametrize("crash_point", ["deepspeed_files", "model_file", "manifest"])
def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, crash_point):
    """A kill while iter_0000004 is written (inside DeepSpeed's save, while writing the full weights, or just before
    the manifest) leaves the pointer on the complete iter_0000002, and --resume continues from it."""
    out = tmp_path / "run"
    opts = ["SOLVER.CHECKPOINT_PERIOD", "2"]
    trainer = StandInTrainer(make_cfg(out, *opts))
    engine_save = trainer.engine.save_checkpoint
    model_save = checkpoint_module.save_model_weights
    text_write = checkpoint_module.atomic_write_text

    def partial_then_kill(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise StopRun

    def deepspeed_save(save_dir, tag=None, **kwargs):
        if tag == "iter_0000004" and crash_point == "deepspeed_files":
            partial_then_kill(Path(save_dir) / tag / "mp_rank_00_model_states.pt")
        return engine_save(save_dir, tag=tag, **kwargs)

    def weights_save(engine, path):
        if path.parent.name == "iter_0000004" and crash_point == "model_file":
            partial_then_kill(path.with_name(path.name + ".tmp"))
        return model_save(engine, path)

    def write_text(path, text):
        if path.name == "manifest.json" and path.parent.name == "iter_0000004" and crash_point == "manifest":
            raise StopRun
        return text_write(path, text)

    monkeypatch.setattr(trainer.engine, "save_checkpoint", deepspeed_save)
    monkeypatch.setattr(checkpoint_module, "save_model_weights", weights_save)
    monkeypatch.setattr(checkpoint_module, "atomic_write_text", write_text)
    with pytest.raises(StopRun):
        trainer.train()
    monkeypatch.undo()
    assert pointer(out) == "iter_0000002"
    verify_checkpoint(out / "checkpoints" / "iter_0000002")
    with pytest.raises(IncompleteCheckpointError, match="iter_0000004"):
        verify_checkpoint(out / "checkpoints" / "iter_0000004")
    trainer = StandInTrainer(make_cfg(out, *opts), resume=True)
    assert trainer.start_iter == 2
    trainer.train()
    assert pointer(out) == "iter_0000006"
    for tag in ("iter_0000002", "iter_0000004", "iter_0000006"):
        verify_checkpoint(out / "checkpoints" / tag)


def test_a_damaged_last_checkpoint_is_named(tmp_path):
    out = tmp_path / "run"
    StandInTrainer(make_cfg(out, "SOLVER.MAX_ITER", "3")).train()
    model_file = out / "checkpoints" / "iter_0000003" / "model.pth"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(IncompleteCheckpointError, match=r"iter_0000003/model.pth is 100 bytes"):
        StandInTrainer(make_cfg(out, "SOLVER.MAX_ITER", "3"), resume=True)


def test_nan_loss_stops_with_a_usable_checkpoint(tmp_path):
    out = tmp_path / "run"
    opts = ["SOLVER.CHECKPOINT_PERIOD", "2"]
    trainer = StandInTrainer(make_cfg(out, *opts))
    trainer.model.nan_at_call = 5
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert "iteration 5" in message and "loss_sem_seg = nan" in message
    assert str(out / "checkpoints" / "iter_0000004") in message and "--resume" in message
    assert pointer(out) == "iter_0000004" and sorted(losses(out)) == [1, 2, 3, 4]
    verify_checkpoint(out / "checkpoints" / "iter_0000004")
    trainer = StandInTrainer(make_cfg(out, *opts), resume=True)
    trainer.train()
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6] and pointer(out) == "iter_0000006"


def test_nan_loss_before_any_checkpoint_says_so(tmp_path):
    trainer = StandInTrainer(make_cfg(tmp_path))
    trainer.model.nan_at_call = 1
    with pytest.raises(FloatingPointError, match="iteration 1 .*No checkpoint was written yet"):
        trainer.train()
    assert not (tmp_path / "checkpoints" / "last_checkpoint").exists()


def test_max_checkpoints_to_keep_and_final_weights(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.MAX_CHECKPOINTS_TO_KEEP", "2")
    trainer = StandInTrainer(cfg)
    trainer.train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000003", "iter_0000004",
                                                                       "last_checkpoint"]
    assert last_checkpoint(out / "checkpoints") == out / "checkpoints" / "iter_0000004"
    assert eval_weights(cfg) == out / "checkpoints" / "iter_0000004" / "model.pth"
    model = StandInSegmentor()
    load_model_weights(model, out / "model_final.pth")
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value.float(), rtol=0, atol=0, msg=name)


def test_periodic_evaluation_logs_and_saves_results(tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2", "DATASETS.TEST", "('demo_shapes_val',)",
                   "TEST.TIMER_WARMUP_BATCHES", "1")
    results = StandInTrainer(cfg).train()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    evaluations = [r for r in records if r.get("dataset") == "demo_shapes_val"]
    assert [r["iteration"] for r in evaluations] == [2, 4] and all(0 <= r["mIoU"] <= 100 for r in evaluations)
    saved = json.loads((out / "inference" / "results.json").read_text())["demo_shapes_val"]
    assert saved["sem_seg"]["mIoU"] == pytest.approx(results["demo_shapes_val"]["sem_seg"]["mIoU"])
    assert saved["speed"]["images_per_second"] > 0 and saved["speed"]["images"] == 99
    assert saved["tokens"]["num_images"] == 100
    assert any((out / "tensorboard").iterdir())


def test_shutil_copy_of_a_checkpoint_resumes_elsewhere(tmp_path):
    """A checkpoint folder is self-contained: copied into another OUTPUT_DIR with a pointer, it resumes there."""
    first, second = tmp_path / "first", tmp_path / "second"
    StandInTrainer(make_cfg(first)).train()
    (second / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "iter_0000003", second / "checkpoints" / "iter_0000003")
    (second / "checkpoints" / "last_checkpoint").write_text("iter_0000003")
    StandInTrainer(make_cfg(second), resume=True).train()
    a, b = final_weights(first), final_weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
