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


def test_time_calls_times_a_plain_callable_batch_by_batch():
    """The timing core takes any callable: here one that sleeps as long as its batch says (not a network)."""
    from algm_d2.evaluation import time_calls

    timed = time_calls(lambda ms: time.sleep(ms / 1000), [5.0, 30.0], warmup=1, iters=3, device="cpu", batch_size=8)
    # whole passes over the two batches: 3 timed calls round up to 4, alternating 5 ms and 30 ms (warm-up: 2)
    assert len(timed.ms_per_call) == 4 and timed.warmup == 2
    assert all(ms >= 5.0 for ms in timed.ms_per_call[0::2]) and all(ms >= 30.0 for ms in timed.ms_per_call[1::2])
    assert timed.median_ms == pytest.approx(sorted(timed.ms_per_call)[1] / 2 + sorted(timed.ms_per_call)[2] / 2)
    assert timed.images_per_second == pytest.approx(8 / (timed.median_ms / 1000))
    assert timed.round_medians == [timed.median_ms] and timed.host_ms is None
    assert timed.overlapped_images_per_second is None and timed.peak_memory_mb is None  # CUDA only


def test_time_interleaved_visits_each_callable_in_turn(monkeypatch):
    """Rounds visit the entries in turn (``select`` first); a sequence gets whole passes each round, an iterator is
    consumed across rounds; the first round's host-timed calls start after a synchronize and are synchronized
    after the last; every timed call ends in a synchronize."""
    from algm_d2.evaluation import TimedCall, throughput, time_interleaved

    log = []
    monkeypatch.setattr(throughput, "_synchronize", lambda device: log.append("sync"))

    def entry(name, batches):
        return TimedCall(fn=lambda batch: log.append(f"{name}:{batch}"), batches=batches, batch_size=1,
                         select=lambda: log.append(f"select {name}"), label=name)

    times = time_interleaved({"cycled": entry("c", ["a", "b"]), "stream": entry("s", iter(range(10)))},
                             warmup=1, iters=2, rounds=2, device="cpu", overlapped=True, host_calls=1)
    first_round = ["select c", "c:a", "c:b", "sync", "c:a", "sync", "c:b", "sync", "sync", "c:a", "sync",
                   "select s", "s:0", "sync", "s:1", "sync", "sync", "s:2", "sync"]
    second_round = ["select c", "c:a", "c:b", "sync", "c:a", "sync", "c:b", "sync",
                    "select s", "s:3", "sync", "s:4", "sync"]
    assert log == first_round + second_round
    assert [len(r) for r in times["cycled"].rounds] == [2, 2] and [len(r) for r in times["stream"].rounds] == [1, 1]
    assert times["cycled"].warmup == 4 and times["stream"].warmup == 2
    assert times["cycled"].host_ms is not None and times["cycled"].overlapped_ms == []  # overlapped: CUDA only
    with pytest.raises(ValueError, match="rounds=0"):
        time_interleaved({}, warmup=0, iters=1, rounds=0, device="cpu")
