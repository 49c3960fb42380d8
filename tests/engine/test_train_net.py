"""train_net.py end to end on the demo data and the real Segmenter through DeepSpeed (CPU, subprocesses): train +
evaluate, --eval-only from the last checkpoint, --resume, a two-machine run against one process started the way the
deepspeed launcher starts it, and the README's main job."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algm_d2.engine.launch import find_free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ["--config-file", str(ROOT / "configs/demo/segmenter_tiny_algm.yaml")]
SMALL = ["MODEL.BACKBONE.EMBED_DIM", "64", "MODEL.BACKBONE.DEPTH", "4", "MODEL.BACKBONE.NUM_HEADS", "2",
         "MODEL.ALGM.GLOBAL_LAYER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.LOG_PERIOD", "1",
         "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0", "TEST.FLOPS_NUM_IMAGES", "1"]
NO_EVAL = ["DATASETS.TEST", "()"]


def run(args, output_dir: Path, *, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train_net.py"), *args, "OUTPUT_DIR", str(output_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def losses(output_dir: Path) -> dict:
    """iteration -> total loss from metrics.json (later lines win, as after a resume)."""
    records = [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]
    return {r["iteration"]: r["total_loss"] for r in records if "total_loss" in r}


def final_weights(output_dir: Path) -> dict:
    return torch.load(output_dir / "model_final.pth", weights_only=True)["model"]


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "inference" / "results.json").read_text())["demo_shapes_val"]


def test_train_then_eval_only_then_resume(tmp_path):
    trained = tmp_path / "run"
    run([*CONFIG, *SMALL, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"], trained)
    assert (trained / "config.yaml").is_file() and (trained / "log.txt").is_file()
    assert "SOLVER:" in (trained / "config.yaml").read_text()
    assert sorted(losses(trained)) == [1, 2, 3, 4] and any((trained / "tensorboard").iterdir())
    assert (trained / "checkpoints" / "last_checkpoint").read_text() == "iter_0000004"
    assert (trained / "model_final.pth").read_bytes() == \
        (trained / "checkpoints" / "iter_0000004" / "model.pth").read_bytes()
    first = results(trained)
    assert 0 <= first["sem_seg"]["mIoU"] <= 100 and first["speed"]["images_per_second"] > 0
    assert 0 < first["tokens"]["algm_layers"]["global"]["kept_ratio"] <= 1 and first["flops"]["gflops_per_image"] > 0

    # --eval-only without MODEL.WEIGHTS evaluates the last checkpoint of OUTPUT_DIR: the same numbers, written
    # under OUTPUT_DIR/eval; the training run's config.yaml and results.json stay as they were
    training_files = {name: (trained / name).read_bytes() for name in ("config.yaml", "inference/results.json")}
    out = run(["--eval-only", *CONFIG, *SMALL, "TEST.COMPUTE_FLOPS", "False"], trained).stdout
    assert "| demo_shapes_val |" in out and "tokens kept after layer 3" in out
    assert results(trained / "eval")["sem_seg"]["mIoU"] == pytest.approx(first["sem_seg"]["mIoU"], abs=1e-6)
    assert {name: (trained / name).read_bytes() for name in training_files} == training_files
    assert "COMPUTE_FLOPS: false" in (trained / "eval" / "config.yaml").read_text()

    # --resume of the finished run says so and trains nothing
    out = run(["--resume", *CONFIG, *SMALL, *NO_EVAL, "SOLVER.MAX_ITER", "4"], trained).stdout
    assert "training is finished" in out and "iteration 4 of SOLVER.MAX_ITER 4" in out
    assert "training iterations" not in out and sorted(losses(trained)) == [1, 2, 3, 4]

    # --resume from the iteration-2 checkpoint (copied into a new OUTPUT_DIR) ends with the same weights
    resumed = tmp_path / "resumed"
    shutil.copytree(trained / "checkpoints" / "iter_0000002", resumed / "checkpoints" / "iter_0000002")
    (resumed / "checkpoints" / "last_checkpoint").write_text("iter_0000002")
    run(["--resume", *CONFIG, *SMALL, *NO_EVAL, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"], resumed)
    assert losses(resumed) == {step: value for step, value in losses(trained).items() if step > 2}
    a, b = final_weights(trained), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_machines_match_one_process(tmp_path):
    """Two train_net.py processes (--num-machines 2 --machine-rank 0/1, gloo on localhost) equal one process with
    the same global batch, which is started here the way the deepspeed launcher starts a rank (RANK/WORLD_SIZE/
    MASTER_* in the environment, --local_rank=0 first). Each rank reads every other sample of the same stream with
    the same augmentations. ALGM runs with the per-image policy: "min" merges by the minimum over each process's
    batch, which differs by design. SGD, because Adam turns float-rounding differences of near-zero gradients into
    full-size steps."""
    opts = [*CONFIG, *SMALL, "SOLVER.MAX_ITER", "3", "INPUT.RATIO_RANGE", "(1.0, 1.0)", "TEST.COMPUTE_FLOPS", "False",
            "MODEL.ALGM.BATCH_POLICY", "per_image", "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01"]
    single = tmp_path / "single"
    launcher = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(find_free_port())}
    run(["--local_rank=0", *opts], single, env=launcher)
    port = find_free_port()
    multi = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_net.py"), "--num-machines", "2", "--machine-rank",
                               str(rank), "--dist-url", f"tcp://127.0.0.1:{port}", *opts, "OUTPUT_DIR", str(multi)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "rank 0 of 2 processes" in (multi / "log.txt").read_text()
    assert "rank 1 of 2 processes" in (multi / "log.txt.rank1").read_text()
    a, b = final_weights(single), final_weights(multi)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    one, two = results(single), results(multi)
    assert two["sem_seg"]["mIoU"] == pytest.approx(one["sem_seg"]["mIoU"], abs=0.05)
    assert two["tokens"]["num_images"] == one["tokens"]["num_images"] == 100


@pytest.mark.slow
def test_demo_main_job_learns_and_merges(tmp_path):
    """The README's main job, unchanged: mIoU far above chance (6 classes: a uniform guess scores under 15 mIoU;
    we require >= 50) and ALGM keeps fewer than 90% of the patch tokens after its global layer."""
    out = tmp_path / "demo"
    stdout = run(CONFIG, out).stdout
    assert "images/s" in stdout and "GFLOPs" in stdout and "tokens kept" in stdout
    final = results(out)
    assert final["sem_seg"]["mIoU"] >= 50.0
    assert final["tokens"]["algm_layers"]["global"]["kept_ratio"] < 0.9
    assert final["flops"]["gflops_per_image"] > 0
