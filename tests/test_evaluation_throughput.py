"""measure_throughput and InferenceTimer on CPU, timed against known sleeps."""
import time

import pytest
import torch

from algm_d2.evaluation import InferenceTimer, measure_throughput


def test_measure_throughput_times_each_batch():
    calls = []

    def sleepy_model(batch):
        calls.append(torch.is_grad_enabled())
        time.sleep(0.01)

    result = measure_throughput(sleepy_model, torch.zeros(4, 3, 8, 8), warmup=2, iters=5)
    assert len(calls) == 7 and not any(calls)  # warm-up + timed calls, all without autograd
    assert result["device"] == "cpu" and result["batch_size"] == 4 and result["iters"] == 5
    assert 10.0 <= result["ms_per_batch_median"] < 500.0
    assert result["ms_per_batch_median"] <= result["ms_per_batch_p90"]
    assert result["images_per_second"] == pytest.approx(4 / (result["ms_per_batch_median"] / 1000))
    assert result["ms_per_image"] == pytest.approx(result["ms_per_batch_median"] / 4)
    assert result["images_per_second"] <= 4 / 0.01
    assert result["peak_memory_mb"] is None


def test_measure_throughput_batch_size_and_arguments():
    model = torch.nn.Linear(8, 8)
    batch = [{"image": torch.randn(8)} for _ in range(3)]
    result = measure_throughput(lambda b: [model(s["image"]) for s in b], batch, warmup=0, iters=2, progress=True)
    assert result["batch_size"] == 3 and result["images_per_second"] > 0
    with pytest.raises(ValueError, match="batch_size"):
        measure_throughput(lambda b: b, {"image": torch.zeros(2)}, iters=1)
    with pytest.raises(ValueError, match="iters=0"):
        measure_throughput(lambda b: b, torch.zeros(2), iters=0)


def test_inference_timer_leaves_out_warmup_batches():
    timer = InferenceTimer(warmup_batches=1)
    assert timer.summary()["images_per_second"] is None
    with timer.time_batch(2):
        time.sleep(0.3)  # warm-up: must not count
    assert timer.summary()["images_per_second"] is None
    for _ in range(2):
        with timer.time_batch(3):
            time.sleep(0.01)
    summary = timer.summary()
    assert summary["images"] == 6 and summary["warmup_images"] == 2
    assert summary["batches"] == 3 and summary["warmup_batches"] == 1
    assert 0.02 <= summary["seconds"] < 0.25
    assert summary["images_per_second"] == pytest.approx(6 / summary["seconds"])
    assert summary["ms_per_image"] == pytest.approx(1000 * summary["seconds"] / 6)
    timer.reset()
    assert timer.summary()["batches"] == 0


def test_every_timed_call_includes_its_synchronize(monkeypatch):
    """The release's protocol: the clock runs from before each call to the device synchronize after it, so host
    work that the GPU queue would hide is counted; here the synchronize takes 20 ms and every timed call shows it."""
    import time as _time

    from algm_d2.evaluation import throughput

    events = []

    def slow_synchronize(device):  # noqa: ANN001
        events.append("sync")
        _time.sleep(0.02)

    monkeypatch.setattr(throughput, "_synchronize", slow_synchronize)
    result = throughput.measure_throughput(lambda _: events.append("call"), None, warmup=1, iters=3, device="cpu",
                                           batch_size=1, keep_times=True)
    assert events == ["call", "sync", "call", "sync", "call", "sync", "call", "sync"]
    assert all(ms >= 20.0 for ms in result["ms_per_batch"])
    assert "overlapped_images_per_second" not in result  # only on CUDA, when asked
