"""What a new user meets first: threads per process, the device default, DeepSpeed's start, one-line errors,
loud warnings for silent defaults (random init, thresholds that merge nothing), evaluation caps and what
TensorBoard receives."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algm_d2.cli import error_line, run_with_short_errors
from algm_d2.config import get_cfg, resolve_device
from algm_d2.engine import runtime
from algm_d2.engine.trainer import eval_only_config, evaluation_scalars, warn_if_random_init
from algm_d2.evaluation.visualize import colorize, prediction_panel, prediction_panels
from algm_d2.modeling import algm_config_from_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_are_the_cores_shared_by_the_local_processes(monkeypatch, torch_threads, caplog):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    with caplog.at_level(logging.INFO):
        assert runtime.set_cpu_threads(2, environ={}) == 4 and torch.get_num_threads() == 4
    assert "4 CPU threads per process (8 cores / 2 local processes" in caplog.text
    assert runtime.set_cpu_threads(16, environ={}) == 1
    assert runtime.set_cpu_threads(2, environ={"OMP_NUM_THREADS": "3"}) == 3  # torchrun's setting wins
    assert runtime.local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert runtime.local_processes({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    assert runtime.local_processes({}) == 1


def test_device_defaults_to_cuda_only_when_a_gpu_is_visible():
    assert get_cfg().MODEL.DEVICE == "auto"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    from algm_d2.engine import default_argument_parser, distributed_backend, load_config

    cfg = load_config(default_argument_parser().parse_args([]))
    assert cfg.MODEL.DEVICE == resolve_device("auto")
    if not torch.cuda.is_available():  # the error comes before a NCCL group is attempted
        assert distributed_backend(cfg) == "gloo"
        with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda' but no GPU is visible"):
            load_config(default_argument_parser().parse_args(["MODEL.DEVICE", "cuda"]))


def test_deepspeed_backend_starts_without_building_the_shared_memory_op():
    runtime.import_deepspeed()
    import importlib

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    original = comm_torch.build_shm_op
    with runtime.without_shm_comm_op():
        assert comm_torch.build_shm_op() is None
    assert comm_torch.build_shm_op is original


def test_own_errors_end_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("ALGM_D2_TRACEBACK", raising=False)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # before logging is set up: the line goes to stderr

    def bad_key():
        raise KeyError("Non-existent config key: MODEL.BAD")

    with pytest.raises(SystemExit) as end:
        run_with_short_errors(bad_key)
    assert end.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Non-existent config key: MODEL.BAD")
    assert error_line(ValueError("a\n  b")) == "error: a b"

    def bug():
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        run_with_short_errors(bug)
    monkeypatch.setenv("ALGM_D2_TRACEBACK", "1")
    with pytest.raises(KeyError):
        run_with_short_errors(bad_key)


def test_train_net_reports_a_missing_config_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train_net.py", "--config-file", "no/such.yaml"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --config-file no/such.yaml: no such file (traceback: ALGM_D2_TRACEBACK=1)"]


def test_random_init_on_real_data_is_warned_loudly(caplog):
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("ade20k_sem_seg_train",)
    with caplog.at_level(logging.WARNING):
        warn_if_random_init(cfg)
    assert "TRAINING FROM RANDOM WEIGHTS on ade20k_sem_seg_train" in caplog.text
    assert "MODEL.BACKBONE.PRETRAINED" in caplog.text
    caplog.clear()
    cfg.MODEL.BACKBONE.PRETRAINED = "vit_small.pth"
    warn_if_random_init(cfg)
    cfg.MODEL.BACKBONE.PRETRAINED = ""
    cfg.DATASETS.TRAIN = ("demo_shapes_train",)  # the demo learns from scratch on purpose
    warn_if_random_init(cfg)
    assert caplog.text == ""


def test_eval_only_writes_into_its_own_folder(tmp_path):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.MODEL.WEIGHTS = "w.pth"
    cfg.freeze()
    eval_cfg, weights = eval_only_config(cfg)
    assert weights == Path("w.pth") and eval_cfg.OUTPUT_DIR == str(tmp_path / "eval")
    assert cfg.OUTPUT_DIR == str(tmp_path) and eval_cfg.is_frozen()


def algm_cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.ALGM.ENABLED", "True", *opts])
    return cfg


def test_calibrated_threshold_at_or_above_one_is_refused(tmp_path):
    path = tmp_path / "tau.json"
    path.write_text(json.dumps({"layers": {"1": {"threshold": 1.047}, "5": {"threshold": 0.6}}}))
    with pytest.raises(ValueError, match=r"tau.json gives layer 1 the threshold 1.0470 .*>= 1.*merge nothing"):
        algm_config_from_cfg(algm_cfg("MODEL.ALGM.CALIBRATION_FILE", str(path)))


def test_thresholds_are_logged_and_an_explicit_one_above_one_is_warned(tmp_path, caplog):
    path = tmp_path / "tau.json"
    path.write_text(json.dumps({"layers": {"1": {"threshold": 0.61}, "5": {"threshold": 0.42}}}))
    with caplog.at_level(logging.INFO):
        algm_config_from_cfg(algm_cfg("MODEL.ALGM.CALIBRATION_FILE", str(path)))
    assert f"CLAP after layer 1: 0.61 (calibrated, {path})" in caplog.text
    assert "GBM after layer 5: batch_stats (MODEL.ALGM.GLOBAL_THRESHOLD); batch policy min" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        algm_config_from_cfg(algm_cfg("MODEL.ALGM.LOCAL_THRESHOLD", "1.2", "MODEL.ALGM.GLOBAL_LAYER", "None"))
    assert "MODEL.ALGM.LOCAL_THRESHOLD = 1.2 >= 1" in caplog.text and "GBM off" in caplog.text


def test_calibration_tool_names_its_pairs_and_warns_of_thresholds_that_merge_nothing(tmp_path, monkeypatch, caplog):
    import importlib.util

    from algm_d2.analysis import calibration

    def stand_in(encoder, batches, layers, *, max_images=None, progress=True):  # noqa: ANN001, ANN202
        return {"layers": {str(layer): {"mean": 0.9, "std": 0.147, "threshold": 1.047, "pairs": 12, "images": 1}
                           for layer in layers}}

    monkeypatch.setattr(calibration, "calibrate_thresholds", stand_in)
    spec = importlib.util.spec_from_file_location("calibrate_tool", ROOT / "tools" / "calibrate_thresholds.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "tau.json"
    with caplog.at_level(logging.WARNING):
        tool.main(["--config-file", str(ROOT / "configs/demo/segmenter_tiny_algm.yaml"), "--num-images", "1",
                   "--output", str(out), "DATALOADER.NUM_WORKERS", "0"])
    saved = json.loads(out.read_text())
    assert "every ordered pair (i, j), i != j, of one image's patch tokens" in saved["pairs"]
    assert "MODEL.WEIGHTS is empty: calibrating randomly initialised weights" in caplog.text
    assert "layer 1: τ = μ + σ = 0.9000 + 0.1470 = 1.0470 >= 1" in caplog.text and "layer 3: τ" in caplog.text


def test_evaluation_scalars_for_tensorboard():
    result = {"sem_seg": {"mIoU": 50.0, "fwIoU": 60.0, "mACC": 70.0, "pACC": 80.0, "IoU-a": 1.0},
              "speed": {"images_per_second": 12.5},
              "tokens": {"algm_layers": {"local": {"layer": 1, "kept_ratio": 0.6},
                                         "global": {"layer": 3, "kept_ratio": 0.4}}}}
    assert evaluation_scalars(result) == {"mIoU": 50.0, "fwIoU": 60.0, "mACC": 70.0, "pACC": 80.0,
                                          "images_per_second": 12.5, "tokens_kept_after_layer_1": 0.6,
                                          "tokens_kept_after_layer_3": 0.4}


def test_prediction_panel_shows_input_truth_and_prediction():
    colors = [(10, 20, 30), (200, 100, 0)]
    labels = torch.tensor([[0, 1], [255, 7]])
    assert colorize(labels, colors, 255).permute(1, 2, 0).tolist() == [
        [[10, 20, 30], [200, 100, 0]], [[0, 0, 0], [0, 0, 0]]]
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)  # resized to the label's 2x2
    panel = prediction_panel(image, torch.tensor([[1, 1], [0, 0]]), labels, colors, 255)
    assert panel.shape == (3, 2, 6) and panel.dtype == torch.uint8
    assert torch.equal(panel[:, :, :2], torch.full((3, 2, 2), 100, dtype=torch.uint8))
    assert panel[:, 0, 4].tolist() == [200, 100, 0] and panel[:, 1, 5].tolist() == [10, 20, 30]


def test_prediction_panels_run_the_model_in_eval_mode():
    class Constant(torch.nn.Module):
        def forward(self, items):  # noqa: ANN001, ANN202
            assert not self.training
            return [{"sem_seg": torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])} for _ in items]

    model = Constant().train()
    batch = [{"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "sem_seg": torch.zeros(2, 2, dtype=torch.long)}] * 2
    panels = prediction_panels(model, [batch, batch], num_images=3, colors=[(1, 1, 1), (9, 9, 9)], ignore_label=255)
    assert len(panels) == 3 and model.training
    assert panels[0][:, 0, 4].tolist() == [9, 9, 9]


def test_test_max_images_caps_an_evaluation():
    from algm_d2.data import build_test_loader

    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs/demo/segmenter_tiny_algm.yaml"))
    cfg.merge_from_list(["DATASETS.TEST_MAX_IMAGES", "3", "DATALOADER.NUM_WORKERS", "0"])
    loader = build_test_loader(cfg, "demo_shapes_val")
    assert sum(len(batch) for batch in loader) == 3
    cfg.DATASETS.TEST_MAX_IMAGES = -1
    with pytest.raises(ValueError, match="DATASETS.TEST_MAX_IMAGES must be >= 0"):
        build_test_loader(cfg, "demo_shapes_val")


def test_flop_count_of_the_demo_model_leaves_no_op_uncounted():
    from algm_d2.data import build_test_loader
    from algm_d2.evaluation import count_gflops
    from algm_d2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(ROOT / "configs/demo/segmenter_tiny_algm.yaml"))
    cfg.merge_from_list(["DATASETS.TEST_MAX_IMAGES", "1", "DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    (item,) = next(iter(build_test_loader(cfg, "demo_shapes_val")))
    assert count_gflops(model, [item])["unsupported_ops"] == {}


def test_throughput_progress_names_its_setting(capsys):
    from algm_d2.evaluation import measure_throughput

    measure_throughput(lambda _: None, None, warmup=0, iters=2, device="cpu", batch_size=1, progress=True,
                       desc="algm_per_image: latency")
    assert "algm_per_image: latency" in capsys.readouterr().err


def test_benchmark_eva_checks_its_layers_before_building(capsys):
    """eva_tiny.yaml has 4 blocks and the default GBM layer 5: the tool stops at once, naming the keys."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_eva_tool", ROOT / "tools" / "benchmark_eva.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as end:
        tool.main(["--config-file", str(ROOT / "configs/demo/eva_tiny.yaml"), "--device", "cpu", "--size", "128"])
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert "the GBM layer 5 (--global-layer or MODEL.ALGM.GLOBAL_LAYER)" in err and "MODEL.BACKBONE.DEPTH (4)" in err
