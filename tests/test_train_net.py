"""train_net.py end to end on the demo data through the real DeepSpeed engine (CPU, subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algm_d2.engine.launch import find_free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["--config-file", str(ROOT / "configs/demo/segmenter_tiny_algm.yaml")]
FAST = ["MODEL.BACKBONE.EMBED_DIM", "64", "MODEL.BACKBONE.DEPTH", "4", "MODEL.BACKBONE.NUM_HEADS", "2",
        "MODEL.ALGM.GLOBAL_LAYER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.LOG_PERIOD", "1",
        "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0", "TEST.COMPUTE_FLOPS", "False"]
NO_EVAL = ["DATASETS.TEST", "()"]


def run(args, output_dir: Path, *, script: str = "train_net.py", check: bool = True, env=None):
    command = [sys.executable, str(ROOT / script), *args, "OUTPUT_DIR", str(output_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def losses(output_dir: Path) -> dict:
    """iteration -> total loss, from metrics.json (later lines win, as after a resume)."""
    out = {}
    for line in (output_dir / "metrics.json").read_text().splitlines():
        record = json.loads(line)
        if "total_loss" in record:
            out[record["iteration"]] = record["total_loss"]
    return out


def final_weights(output_dir: Path) -> dict:
    return torch.load(output_dir / "model_final.pth", weights_only=True)["model"]


def test_train_then_eval_only(tmp_path):
    out = tmp_path / "run"
    run([*CONFIG, *FAST, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"], out)
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "iter_0000004"
    assert list((out / "tensorboard").iterdir())
    trained = json.loads((out / "inference" / "results.json").read_text())["demo_shapes_val"]
    assert 0 <= trained["sem_seg"]["mIoU"] <= 100 and trained["speed"]["images_per_second"] > 0
    assert trained["tokens"]["algm_layers"]["local"]["kept_ratio"] <= 1.0
    evaluated = tmp_path / "eval"
    result = run(["--eval-only", *CONFIG, *FAST, "MODEL.WEIGHTS", str(out / "model_final.pth")], evaluated)
    assert "mIoU" in result.stdout
    again = json.loads((evaluated / "inference" / "results.json").read_text())["demo_shapes_val"]
    assert again["sem_seg"]["mIoU"] == pytest.approx(trained["sem_seg"]["mIoU"], abs=1e-6)


@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (0, "bf16"), (2, "bf16")])
def test_zero_stages_and_precisions(tmp_path, stage, precision):
    out = tmp_path / "run"
    run([*CONFIG, *FAST, *NO_EVAL, "SOLVER.MAX_ITER", "3", "SOLVER.CLIP_GRADIENTS", "1.0",
         "DEEPSPEED.ZERO_STAGE", str(stage), "DEEPSPEED.PRECISION", precision], out)
    values = losses(out)
    assert sorted(values) == [1, 2, 3] and all(v == v and v < 10 for v in values.values())
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "bf16")])
def test_resume_continues_exactly(tmp_path, stage, precision):
    opts = [*CONFIG, *FAST, *NO_EVAL, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "100",
            "DEEPSPEED.ZERO_STAGE", str(stage), "DEEPSPEED.PRECISION", precision, "SOLVER.GRAD_ACCUM_STEPS", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(opts, straight)
    run(["--stop-at", "3", *opts], resumed, script="tests/engine_driver.py")
    assert (resumed / "checkpoints" / "last_checkpoint").read_text() == "iter_0000003"
    run(["--resume", *opts], resumed)
    assert losses(resumed) == losses(straight)
    a, b = final_weights(straight), final_weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_nan_loss_stops_with_a_usable_checkpoint(tmp_path):
    out = tmp_path / "run"
    opts = [*CONFIG, *FAST, *NO_EVAL, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"]
    result = run(["--nan-at", "5", *opts], out, script="tests/engine_driver.py", check=False)
    assert result.returncode != 0
    assert "non-finite at iteration 5" in result.stderr + result.stdout
    assert "iter_0000004" in result.stderr + result.stdout
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "iter_0000004"
    run(["--resume", *opts], out)
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    opts = [*CONFIG, *FAST, *NO_EVAL, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"]
    result = run(["--crash-in-save-at", "4", *opts], out, script="tests/engine_driver.py", check=False)
    assert result.returncode != 0
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "iter_0000002"
    run(["--resume", *opts], out)
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "iter_0000006"


@pytest.mark.slow
def test_two_machines_match_one_process(tmp_path):
    """Two train_net.py processes (--num-machines 2, gloo on localhost) equal one process with the same global
    batch: each rank reads every other sample of the same stream with the same augmentations. ALGM runs with the
    per-image policy: the "min" policy merges by the minimum over each process's batch, which differs by design.
    SGD, because Adam turns float-rounding differences of near-zero gradients into full-size steps."""
    opts = [*CONFIG, *FAST, "SOLVER.MAX_ITER", "3", "INPUT.RATIO_RANGE", "(1.0, 1.0)",
            "MODEL.ALGM.BATCH_POLICY", "per_image", "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01"]
    single = tmp_path / "single"
    run(opts, single)
    port = find_free_port()
    multi = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_net.py"), "--num-machines", "2", "--machine-rank",
                               str(rank), "--dist-url", f"tcp://127.0.0.1:{port}", *opts, "OUTPUT_DIR", str(multi)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    a, b = final_weights(single), final_weights(multi)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert losses(single) == pytest.approx(losses(multi), rel=1e-5)
    one = json.loads((single / "inference" / "results.json").read_text())["demo_shapes_val"]["sem_seg"]
    two = json.loads((multi / "inference" / "results.json").read_text())["demo_shapes_val"]["sem_seg"]
    assert two["mIoU"] == pytest.approx(one["mIoU"], abs=0.05)


@pytest.mark.slow
def test_demo_main_job_learns_and_merges(tmp_path):
    """The README's main job, unchanged: mIoU far above chance (6 classes: a uniform guess scores under 15 mIoU;
    we require >= 50) and ALGM keeps fewer than 90% of the patch tokens after its global layer."""
    out = tmp_path / "demo"
    result = run(CONFIG, out)
    assert "images/s" in result.stdout and "GFLOPs" in result.stdout and "tokens kept" in result.stdout
    results = json.loads((out / "inference" / "results.json").read_text())["demo_shapes_val"]
    assert results["sem_seg"]["mIoU"] >= 50.0
    assert results["tokens"]["algm_layers"]["global"]["kept_ratio"] < 0.9
    assert results["flops"]["gflops_per_image"] > 0
