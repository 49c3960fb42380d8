"""SemSegEvaluator against a hand-computed confusion matrix, and its reduction over two gloo ranks."""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from algm_d2.config import get_cfg
from algm_d2.evaluation import MergeStatsAccumulator, SemSegEvaluator

CLASS_NAMES = ["road", "car", "sky", "tree"]  # "tree" never occurs in the ground truth
IGNORE = 255


def _scores(pred: torch.Tensor, num_classes: int = len(CLASS_NAMES)) -> torch.Tensor:
    """One-hot class scores [K, H, W] whose argmax is ``pred``."""
    return F.one_hot(pred, num_classes).permute(2, 0, 1).float()


def _samples():
    # (ground truth, prediction) per image; the prediction at ignored pixels must not count.
    gt1 = torch.tensor([[0, 0, 1], [1, IGNORE, 2]])
    pred1 = torch.tensor([[0, 1, 1], [1, 2, 2]])
    gt2 = torch.tensor([[0, 0], [2, IGNORE]])
    pred2 = torch.tensor([[0, 3], [0, 1]])
    return [({"sem_seg": gt1, "file_name": "a.png"}, {"sem_seg": _scores(pred1)}),
            ({"sem_seg": gt2, "file_name": "b.png"}, {"sem_seg": _scores(pred2)})]


# Hand count, (gt, pred) pairs: image a: (0,0) (0,1) (1,1) (1,1) (ign,2) (2,2); image b: (0,0) (0,3) (2,0) (ign,1).
# Rows = prediction, columns = ground truth, column 4 = ignored.
EXPECTED_CONFUSION = [
    [2, 0, 1, 0, 0],  # predicted road: gt road a(0,0), b(0,0); gt sky b(1,0)
    [1, 2, 0, 0, 1],  # predicted car: gt road a(0,1); gt car a(0,2), a(1,0); ignored b(1,1)
    [0, 0, 1, 0, 1],  # predicted sky: gt sky a(1,2); ignored a(1,1)
    [1, 0, 0, 0, 0],  # predicted tree: gt road b(0,1)
    [0, 0, 0, 0, 0],
]
# tp = [2, 2, 1, 0], pos_gt (column sums) = [4, 2, 2, 0], pos_pred (row sums w/o ignored) = [3, 3, 1, 1]
# ACC = tp / pos_gt = [1/2, 1, 1/2, nan (absent)]; union = pos_gt + pos_pred - tp = [5, 3, 2, 1]
# IoU = [2/5, 2/3, 1/2, nan (absent from the GT, so excluded although predicted)]
# mIoU = (2/5 + 2/3 + 1/2) / 3 = 47/90; mACC = 2/3; pACC = 5/8
# fwIoU = 4/8 * 2/5 + 2/8 * 2/3 + 2/8 * 1/2 = 59/120
EXPECTED = {
    "mIoU": 52.222222222222, "fwIoU": 49.166666666667, "mACC": 66.666666666667, "pACC": 62.5,
    "IoU-road": 40.0, "IoU-car": 66.666666666667, "IoU-sky": 50.0,
    "ACC-road": 50.0, "ACC-car": 100.0, "ACC-sky": 50.0,
}


def _check_expected(scores):
    for key, value in EXPECTED.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key
    assert math.isnan(scores["IoU-tree"]) and math.isnan(scores["ACC-tree"])
    assert list(scores)[:2] == ["mIoU", "fwIoU"]


def test_hand_computed_confusion_and_scores(tmp_path):
    evaluator = SemSegEvaluator(class_names=CLASS_NAMES, ignore_label=IGNORE, output_dir=str(tmp_path))
    evaluator.reset()
    for sample, output in _samples():
        evaluator.process([sample], [output])
    assert evaluator.confusion_matrix.tolist() == EXPECTED_CONFUSION
    results = evaluator.evaluate()
    _check_expected(results["sem_seg"])
    saved = json.loads((tmp_path / "sem_seg_evaluation.json").read_text())
    assert saved["sem_seg"]["mIoU"] == pytest.approx(EXPECTED["mIoU"])
    assert saved["sem_seg"]["IoU-tree"] is None  # nan is written as null (strict JSON)

    evaluator.reset()
    assert evaluator.confusion_matrix.sum() == 0


def test_predictions_on_ignored_pixels_do_not_count():
    evaluator = SemSegEvaluator(class_names=CLASS_NAMES, ignore_label=IGNORE)
    for sample, output in _samples():
        pred = output["sem_seg"].argmax(0)
        pred[sample["sem_seg"] == IGNORE] = 3  # the ignored pixels now say "tree"
        evaluator.process([sample], [{"sem_seg": _scores(pred)}])
    _check_expected(evaluator.evaluate()["sem_seg"])


def test_bad_inputs_name_the_file():
    evaluator = SemSegEvaluator(class_names=CLASS_NAMES, ignore_label=IGNORE)
    gt = torch.tensor([[0, 4], [7, IGNORE]])
    with pytest.raises(ValueError, match=r"bad\.png.*\[4, 7\]"):
        evaluator.process([{"sem_seg": gt, "file_name": "bad.png"}], [{"sem_seg": _scores(torch.zeros_like(gt))}])
    with pytest.raises(ValueError, match=r"small\.png.*\(2, 2\)"):
        evaluator.process([{"sem_seg": torch.zeros(3, 3, dtype=torch.long), "file_name": "small.png"}],
                          [{"sem_seg": _scores(torch.zeros(2, 2, dtype=torch.long))}])
    with pytest.raises(ValueError, match=r"c\.png.*K=4"):
        evaluator.process([{"sem_seg": torch.zeros(2, 2, dtype=torch.long), "file_name": "c.png"}],
                          [{"sem_seg": torch.zeros(3, 2, 2)}])
    with pytest.raises(ValueError, match="ignore_label 2"):
        SemSegEvaluator(class_names=CLASS_NAMES, ignore_label=2)


def test_from_config_checks_the_class_count():
    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    assert SemSegEvaluator.from_config(cfg, class_names=CLASS_NAMES).ignore_label == cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        SemSegEvaluator.from_config(cfg, class_names=CLASS_NAMES[:3])


# Per rank: one image and one batch of merge statistics (prefix 1, 9 tokens at the start, 2 blocks).
_RANK_MERGE_STATS = [
    {"tokens_per_layer": [[9, 5], [7, 3]], "initial_tokens": 9, "num_prefix": 1},
    {"tokens_per_layer": [[5], [5]], "initial_tokens": 9, "num_prefix": 1},
]


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        sample, output = _samples()[rank]
        evaluator = SemSegEvaluator(class_names=CLASS_NAMES, ignore_label=IGNORE, output_dir=out_dir)
        evaluator.process([sample], [output])
        results = evaluator.evaluate()
        merge_stats = MergeStatsAccumulator(local_layer=1)
        merge_stats.update(_RANK_MERGE_STATS[rank])
        summary = merge_stats.summary()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"results": results, "merge_stats": summary}, handle)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_reduce_to_the_single_process_result(tmp_path):
    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = MergeStatsAccumulator(local_layer=1)
    for stats in _RANK_MERGE_STATS:
        single.update(stats)
    expected_merge = json.loads(json.dumps(single.summary()))
    for rank in range(2):
        reported = json.loads((tmp_path / f"rank{rank}.json").read_text())
        _check_expected(reported["results"]["sem_seg"])  # each rank alone saw one image; the reduced matrix holds both
        assert reported["merge_stats"] == expected_merge
        assert reported["merge_stats"]["num_images"] == 3
    assert (tmp_path / "sem_seg_evaluation.json").exists()  # written by rank 0


def test_confusion_matrix_stays_on_the_prediction_device():
    evaluator = SemSegEvaluator(class_names=CLASS_NAMES, ignore_label=IGNORE)
    sample, output = _samples()[0]
    evaluator.process([sample], [{"sem_seg": output["sem_seg"].double()}])
    assert evaluator.confusion_matrix.device == output["sem_seg"].device
    assert evaluator.confusion_matrix.dtype == torch.int64
    assert int(evaluator.confusion_matrix.sum()) == sample["sem_seg"].numel()
