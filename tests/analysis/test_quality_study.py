"""tools/demo_quality_study.py --smoke on the CPU: it trains, evaluates every setting and writes the JSON and the
markdown; the plain row's mIoU equals a direct evaluation of the weights it kept, and ALGM* is the smallest swept τ
whose mIoU is not below the plain one."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "demo_quality_study.py"
SETTINGS = ["plain", "ALGM training-free (release rules)", "ALGM calibrated τ = μ + σ",
            "ALGM fine-tuned (release rules)"]


def load_tool():
    spec = importlib.util.spec_from_file_location("demo_quality_study", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    result = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--smoke", "--models", "tiny",
                             "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_writes_json_and_markdown_with_every_field(smoke_study):
    out, stdout = smoke_study
    tool = load_tool()
    study = json.loads((out / "quality_study.json").read_text())
    model = study["models"]["tiny"]
    rows = model["rows"]
    assert [row["setting"] for row in rows[:4]] == SETTINGS
    assert len(rows) == 4 + (model["algm_star_tau"] is not None)
    plain = rows[0]["mIoU"]
    for row in rows:
        assert set(tool.ROW_FIELDS) <= set(row), row
        assert 0.0 <= row["mIoU"] <= 100.0 and row["delta_mIoU"] == pytest.approx(row["mIoU"] - plain, abs=1e-12)
        assert row["images_per_second"] > 0 and row["gflops"] > 0
        assert 0.0 < row["kept_tokens_final"] <= row["kept_tokens_mean"] <= 1.0
    assert rows[0]["kept_tokens_mean"] == rows[0]["kept_tokens_final"] == 1.0
    # the early stop kept the best of the evaluations it made
    for run in (model["plain_training"], model["algm_finetuning"]):
        assert run["best"]["mIoU"] == max(h["mIoU"] for h in run["history"])
        assert Path(run["weights"]).is_file()
    markdown = (out / "quality_study.md").read_text()
    assert "### Seg-T" in markdown and markdown in stdout
    table = [line for line in markdown.splitlines() if line.startswith("| ")][1:]  # header left out
    assert [line.split(" | ")[0][2:] for line in table] == [row["setting"] for row in rows]


def test_algm_star_is_the_smallest_tau_not_below_plain(smoke_study):
    out, _ = smoke_study
    model = json.loads((out / "quality_study.json").read_text())["models"]["tiny"]
    plain = model["rows"][0]["mIoU"]
    good = [row["tau"] for row in model["sweep"] if row["mIoU"] >= plain]
    assert model["algm_star_tau"] == (min(good) if good else None)


def test_calibrated_config_holds_the_thresholds_used(smoke_study):
    out, _ = smoke_study
    model = json.loads((out / "quality_study.json").read_text())["models"]["tiny"]
    calibration = model["calibration"]
    written = yaml.safe_load(Path(calibration["config"]).read_text())["MODEL"]["ALGM"]
    for key, value in calibration["thresholds"].items():
        assert written[key] == pytest.approx(value)
        layer = 1 if key == "LOCAL_THRESHOLD" else 5
        stats = calibration["layers"][str(layer)]
        assert value == pytest.approx(stats["mean"] + stats["std"])
    assert f"τ {calibration['thresholds']['LOCAL_THRESHOLD']:.3f} after layer 1" == model["rows"][2]["local_rule"]


def test_plain_row_equals_a_direct_evaluation(smoke_study):
    from algm_d2.analysis.sweep import evaluate_setting
    from algm_d2.checkpoint import load_model_weights
    from algm_d2.config import get_cfg
    from algm_d2.merge import OFF
    from algm_d2.modeling import build_model

    out, _ = smoke_study
    tool = load_tool()
    datasets = tool.register_study_datasets(tool.parse_args(["--device", "cpu", "--smoke"]))
    cfg = get_cfg()
    cfg.merge_from_file(str(out / "tiny" / "plain" / "config.yaml"))
    model = build_model(cfg).eval()
    load_model_weights(model, str(out / "tiny" / "plain" / "model_best.pth"))
    direct = evaluate_setting(cfg, model, OFF, datasets["val"], flops_images=0)
    study = json.loads((out / "quality_study.json").read_text())
    assert study["models"]["tiny"]["rows"][0]["mIoU"] == pytest.approx(direct["mIoU"], abs=1e-6)


def test_help_and_bad_crop():
    tool = load_tool()
    with pytest.raises(SystemExit):
        tool.parse_args(["--crop", "100"])
    args = tool.parse_args(["--device", "cpu"])
    assert (args.precision, args.num_workers, args.crop) == ("fp32", 0, 256)


def test_plateau_stops_after_patience_evaluations_without_improvement():
    plateau = load_tool().Plateau(patience=2, deadline=100.0, max_iter=50)
    steps = [(10, 40.0, False), (20, 45.0, False), (30, 45.0, False), (40, 44.0, True)]
    decisions = [plateau.update(iteration, miou, now=0.0) for iteration, miou, _ in steps]
    assert decisions == [(True, None), (True, None), (False, None), (False, "patience")]
    assert plateau.best == {"iteration": 20, "mIoU": 45.0}  # a tie is no improvement
    assert [entry["iteration"] for entry in plateau.history] == [10, 20, 30, 40]


def test_plateau_time_and_last_iteration():
    plateau = load_tool().Plateau(patience=1, deadline=5.0, max_iter=20)
    assert plateau.update(10, 30.0, now=6.0) == (True, "time")
    late = load_tool().Plateau(patience=1, deadline=5.0, max_iter=20)
    assert late.update(10, 30.0, now=1.0) == (True, None)
    assert late.update(20, 10.0, now=9.0) == (False, None)  # training ends there anyway
