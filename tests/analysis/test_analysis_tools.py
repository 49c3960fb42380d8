"""The analysis tools (Figures 2, 4, 5, the calibrated config) and the demo: each writes its PNG and JSON, and its
numbers equal a direct computation on a tiny model and a few procedural images."""
from __future__ import annotations

import importlib.util
import itertools
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algm_d2.analysis import (
    algm_star, class_pair_sums, labelled_batches, merge_groups, patch_labels, setup_model, states_after_merges,
)
from algm_d2.analysis.demo import image_files, input_images, merge_panels
from algm_d2.analysis.sweep import with_threshold
from algm_d2.config import get_cfg
from algm_d2.data import DATASET_REGISTRY, DemoShapes, get_metadata, register_dataset, render_demo_shapes
from algm_d2.evaluation import count_gflops
from algm_d2.merge import OFF, ALGMConfig
from algm_d2.modeling import algm_config_from_cfg

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs/demo/segmenter_tiny_algm.yaml")
DATASET = "analysis_tools_demo_val"
SIZE = 96  # a 6x6 patch grid: 4x4 windows leave border cells


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only add synchronisation
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def opts(tmp_path_factory):
    if DATASET not in DATASET_REGISTRY:
        register_dataset(DATASET, DemoShapes(split="val", num_images=3, image_size=SIZE),
                         get_metadata("demo_shapes_val"))
    sizes = ["MODEL.BACKBONE.IMG_SIZE", str(SIZE), "MODEL.BACKBONE.EMBED_DIM", "64", "MODEL.BACKBONE.NUM_HEADS", "2",
             "MODEL.BACKBONE.DEPTH", "4", "INPUT.CROP_SIZE", f"({SIZE}, {SIZE})", "INPUT.MIN_SIZE_TEST", str(SIZE),
             "INPUT.MAX_SIZE_TEST", str(2 * SIZE), "DATASETS.TRAIN", f"('{DATASET}',)", "DATASETS.TEST",
             f"('{DATASET}',)", "DATALOADER.NUM_WORKERS", "0", "TEST.TIMER_WARMUP_BATCHES", "0",
             "MODEL.ALGM.LOCAL_THRESHOLD", "top:3", "MODEL.ALGM.GLOBAL_THRESHOLD", "top:2"]
    torch.manual_seed(0)
    _, model = setup_model(CONFIG, sizes)
    weights = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    return sizes + ["MODEL.WEIGHTS", str(weights)]


def brute_force_pairs(tokens, labels, groups):
    """(intra Σcos, intra pairs, inter Σcos, inter pairs) by looping over the ordered pairs i≠j of each group."""
    sums = [0.0, 0, 0.0, 0]
    unit = F.normalize(tokens.double(), dim=-1)
    for i, j in itertools.permutations(range(len(labels)), 2):
        if labels[i] < 0 or labels[j] < 0 or groups[i] < 0 or groups[i] != groups[j]:
            continue
        k = 0 if labels[i] == labels[j] else 2
        sums[k] += float(unit[i] @ unit[j])
        sums[k + 1] += 1
    return sums


@pytest.mark.parametrize("seed", range(4))
def test_class_pair_sums_equal_the_pairwise_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(30, 5, generator=gen)
    tokens[3] = 0  # a zero token has cosine 0 with everything, as in CLAP
    labels = torch.randint(-1, 4, (30,), generator=gen)
    groups = torch.randint(-1, 3, (30,), generator=gen)
    ours = class_pair_sums(tokens, labels, groups)
    ref = brute_force_pairs(tokens, labels.tolist(), groups.tolist())
    assert ours[1] == ref[1] and ours[3] == ref[3]
    assert ours[0] == pytest.approx(ref[0], abs=1e-9) and ours[2] == pytest.approx(ref[2], abs=1e-9)


def test_patch_labels_take_the_most_frequent_label_smallest_on_ties():
    labels = torch.tensor([[0, 0, 1, 2], [1, 255, 2, 1], [255, 255, 3, 3], [255, 4, 4, 3]])[None]
    expected = []
    for py, px in itertools.product(range(2), range(2)):
        votes = Counter(labels[0, 2 * py:2 * py + 2, 2 * px:2 * px + 2].flatten().tolist())
        top = max(votes.values())
        label = min(v for v, c in votes.items() if c == top)
        expected.append(-1 if label == 255 else label)
    assert patch_labels(labels, 2, 255).flatten().tolist() == expected == [0, 1, -1, 3]


def test_analyze_similarity_tool_writes_figure_2_and_agrees_with_pair_loops(tmp_path, opts):
    load_tool("analyze_similarity").main(["--config-file", CONFIG, "--num-images", "2", "--batch-size", "2",
                                          "--window-sizes", "2", "4", "8", "--output-dir", str(tmp_path), *opts])
    result = json.loads((tmp_path / "similarity.json").read_text())
    assert (tmp_path / "similarity.png").stat().st_size > 0
    assert set(result["windows"]) == {"2", "4"} and set(result["layers"]) == {"1", "2", "3", "4"}  # 8 > 6x6 grid
    cfg, model = setup_model(CONFIG, opts)
    images, labels = next(labelled_batches(cfg, model, DATASET, size=(SIZE, SIZE), batch_size=2, max_images=2))
    seen = {}
    model.net.backbone(images, observer=lambda layer, x, state: seen.setdefault(layer, x[:, 1:]), algm=OFF)
    cells = patch_labels(labels, 16, 255).flatten(1)
    for key, layer, groups in (("windows", 1, "2"), ("windows", 1, "4"), ("layers", 4, None)):
        total = [0.0, 0, 0.0, 0]
        for b in range(2):
            if groups is None:
                window = [0] * 36
            else:
                k = int(groups)
                window = [(r // k) * (6 // k) + c // k if r < 6 // k * k and c < 6 // k * k else -1
                          for r in range(6) for c in range(6)]
            for i, v in enumerate(brute_force_pairs(seen[layer][b], cells[b].tolist(), window)):
                total[i] += v
        entry = result[key][groups or str(layer)]
        assert entry["intra_pairs"] == total[1] and entry["inter_pairs"] == total[3]
        assert entry["intra_class"] == pytest.approx(total[0] / total[1], abs=1e-9)
        assert entry["inter_class"] == pytest.approx(total[2] / total[3], abs=1e-9)


def test_algm_star_is_the_smallest_tau_not_below_the_baseline():
    rows = [{"tau": 0.9, "mIoU": 40.0}, {"tau": 0.5, "mIoU": 38.0}, {"tau": 0.7, "mIoU": 40.0}, {"tau": 0.8, "mIoU": 39}]
    assert algm_star(rows, 40.0)["tau"] == 0.7
    assert algm_star(rows, 41.0) is None
    config = with_threshold(ALGMConfig(global_layer=None), 0.6, "both")
    assert config.local_threshold == 0.6 and config.global_layer is None
    with pytest.raises(ValueError, match="no active ALGM stage"):
        with_threshold(ALGMConfig(global_layer=None), 0.6, "global")


def direct_miou(model, cfg, algm):
    """mIoU (%) of ``model`` under ``algm`` on DATASET by a confusion matrix built here."""
    model.net.set_algm(algm)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for _, item in input_images(cfg, [], dataset=DATASET, num_images=3):
        with torch.no_grad():
            pred = model([item])[0]["sem_seg"].argmax(0).numpy()
        _, gt = render_demo_shapes(seed=0, split="val", index=int(item["image_id"].split("/")[1]), size=SIZE)
        np.add.at(confusion, (gt.flatten(), pred.flatten()), 1)
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    return 100 * float(np.nanmean(np.where(confusion.sum(1) > 0, iou, np.nan)))


def test_sweep_threshold_tool_writes_figure_4_and_agrees_with_a_direct_evaluation(tmp_path, opts):
    load_tool("sweep_threshold").main(["--config-file", CONFIG, "--taus", "0.9", "0.3", "--flops-images", "1",
                                       "--output-dir", str(tmp_path), *opts])
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert [row["tau"] for row in result["sweep"]] == [0.3, 0.9]
    cfg, model = setup_model(CONFIG, opts)
    configured = algm_config_from_cfg(cfg)
    assert result["baseline"]["mIoU"] == pytest.approx(direct_miou(model, cfg, OFF), abs=1e-6)
    low = ALGMConfig(local_layer=1, global_layer=3, local_threshold=0.3, global_threshold=0.3)
    assert result["sweep"][0]["mIoU"] == pytest.approx(direct_miou(model, cfg, low), abs=1e-6)
    assert result["configured"]["mIoU"] == pytest.approx(direct_miou(model, cfg, configured), abs=1e-6)
    model.net.set_algm(low)
    _, first = next(input_images(cfg, [], dataset=DATASET, num_images=1))
    assert result["sweep"][0]["gflops"] == pytest.approx(count_gflops(model, [first])["gflops"], rel=1e-9)
    assert result["algm_star"] == algm_star(result["sweep"], result["baseline"]["mIoU"])
    assert all(row["images_per_second"] > 0 for row in result["sweep"])


def test_visualize_merging_tool_writes_figure_5_with_the_model_groups(tmp_path, opts):
    load_tool("visualize_merging").main(["--config-file", CONFIG, "--num-images", "2", "--output-dir", str(tmp_path),
                                         *opts])
    pngs = sorted(tmp_path.glob("*_merging.png"))
    assert [p.name for p in pngs] == ["val_00000_merging.png", "val_00001_merging.png"]
    result = json.loads((tmp_path / "val_00000_merging.json").read_text())
    assert result["grid"] == [6, 6] and list(result["panels"]) == ["after layer 1 (CLAP)", "after layer 3 (GBM)"]
    clap, gbm = result["panels"].values()
    assert len(clap) == 3 and all(len(g) == 4 for g in clap)  # top:3 windows of 2x2
    for group in clap:  # each a 2x2 window aligned to the grid
        rows, cols = {c // 6 for c in group}, {c % 6 for c in group}
        assert len(rows) == len(cols) == 2 and min(rows) % 2 == 0 and min(cols) % 2 == 0
    cfg, model = setup_model(CONFIG, opts)
    _, item = next(input_images(cfg, [], dataset=DATASET, num_images=1))
    state = states_after_merges(model, item["image"])[3]
    slots = {}
    for cell, slot in enumerate(state.index_map[0].tolist()):
        slots.setdefault(slot, []).append(cell)
    assert sorted(map(sorted, gbm)) == sorted(sorted(c) for c in slots.values() if len(c) > 1)
    assert merge_groups(state) == gbm


def test_demo_tool_writes_segmentations_and_reports_tokens(tmp_path, opts, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        picture, _ = render_demo_shapes(seed=3, split="val", index=i, size=80 + 16 * i)  # any size
        cv2.imwrite(str(images / f"photo{i}.png"), picture[..., ::-1])
    out = tmp_path / "out"
    load_tool("demo").main(["--config-file", CONFIG, "--input", str(images / "photo0.png"), str(images),
                            "--output", str(out), *opts])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["demo.json", "photo0_merging.png", "photo0_seg.png", "photo1_merging.png", "photo1_seg.png"]
    report = json.loads((out / "demo.json").read_text())
    assert report["summary"]["images"] == 2 and report["summary"]["images_per_second"] > 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "patch tokens kept" in printed
    cfg, model = setup_model(CONFIG, opts)
    metadata = get_metadata(DATASET)
    for record, (_, item) in zip(report["images"], input_images(cfg, [str(images)])):
        with torch.no_grad():
            labels = model([item])[0]["sem_seg"].argmax(0)
        stats = model.merge_stats
        assert record["kept_patch_tokens"] == stats["tokens_per_layer"][-1][0] - 1
        assert set(record["classes"]) == {metadata.stuff_classes[i] for i in labels.unique().tolist()}
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        image_files([str(tmp_path / "nothing.jpg")])


def test_calibration_tool_writes_a_config_with_the_calibrated_thresholds(tmp_path, opts):
    out = tmp_path / "tau.json"
    written = tmp_path / "configs" / "calibrated.yaml"
    load_tool("calibrate_thresholds").main(["--config-file", CONFIG, "--num-images", "2", "--batch-size", "2",
                                            "--output", str(out), "--write-config", str(written), *opts])
    layers = json.loads(out.read_text())["layers"]
    cfg = get_cfg()
    cfg.merge_from_file(str(written))
    assert cfg.MODEL.ALGM.LOCAL_THRESHOLD == pytest.approx(layers["1"]["threshold"])
    assert cfg.MODEL.ALGM.GLOBAL_THRESHOLD == pytest.approx(layers["3"]["threshold"])
    assert cfg.MODEL.BACKBONE.DEPTH == 6 and cfg.MODEL.ALGM.ENABLED  # the rest comes from _BASE_
    algm = algm_config_from_cfg(cfg)
    assert algm.local_threshold == pytest.approx(layers["1"]["threshold"])


def test_merge_panels_pad_as_mask2former_does():
    """EVA + ViT-Adapter pads to 32, not the patch: an 80×112 input becomes a 6×8 grid (96×128)."""
    _, model = setup_model(str(ROOT / "configs/demo/eva_tiny_algm.yaml"), ["MODEL.ALGM.LOCAL_THRESHOLD", "top:2"])
    item = {"image": torch.randint(0, 256, (3, 80, 112), dtype=torch.uint8)}
    picture, grid, panels = merge_panels(model, item)
    assert picture.shape == (96, 128, 3) and grid == (6, 8)
    assert list(panels) == ["after layer 1 (CLAP)", "after layer 3 (GBM)"] and len(panels["after layer 1 (CLAP)"]) == 2
