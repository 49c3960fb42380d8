"""Speed benchmark of a segmentation network with and without ALGM, as ratios measured in one run.

Two protocols: ``repeat`` feeds one image copied ×batch (the release's protocol: every image of a batch merges the
same tokens) and ``mixed`` feeds distinct images (what evaluation sees: under the ``min`` policy the batch merges
as little as its least mergeable image). For each ALGM setting it reports images/s (median after warm-up), batch-1
latency, peak memory, GFLOPs per image (fvcore multiply-adds, attention counted) and kept tokens after each block.
"""
from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import precision_dtype
from ..merge import OFF, ALGMConfig, FixedLevel
from .flop_count import count_gflops
from .throughput import CallTimes, TimedCall, images_per_second, measure_throughput, time_interleaved

logger = logging.getLogger(__name__)

PROTOCOLS = ("repeat", "mixed")
OUTPUTS = ("logits", "labels")
# The paper's Seg-S token counts at 512² (1025 → 833 after CLAP → 708 after GBM) as fractions of the candidates:
# 64 of 256 windows, 125 of 416 A-side tokens. The same fractions give the paper's level for other sizes.
PAPER_LOCAL_FRACTION = 64 / 256
PAPER_GLOBAL_FRACTION = 125 / 416


def standard_settings(local_layer: int = 1, global_layer: int = 5, threshold: float = 0.88
                      ) -> Dict[str, ALGMConfig]:
    """The benchmark's settings: plain, the release's rule (both policies), the paper's token level, and both
    stages on but merging nothing, twice: at fixed level 0 (the stages know nothing merges) and with τ above any
    cosine (``level0_scored``: every candidate scored, the host synced
    for the counts, nothing merged: the cost of the threshold machinery itself)."""
    layers = {"local_layer": local_layer, "global_layer": global_layer}
    return {
        "baseline": OFF,
        "algm": ALGMConfig(**layers, local_threshold=threshold, global_threshold="batch_stats", batch_policy="min"),
        "algm_per_image": ALGMConfig(**layers, local_threshold=threshold, global_threshold="batch_stats",
                                     batch_policy="per_image"),
        "paper_level": ALGMConfig(**layers, local_threshold=FixedLevel(fraction=PAPER_LOCAL_FRACTION),
                                  global_threshold=FixedLevel(fraction=PAPER_GLOBAL_FRACTION)),
        "level0": ALGMConfig(**layers, local_threshold=FixedLevel(count=0), global_threshold=FixedLevel(count=0)),
        "level0_scored": ALGMConfig(**layers, local_threshold=2.0, global_threshold=2.0),
    }


def _batches(images: Tensor, batch_size: int, protocol: str, mixed_images: Optional[Tensor] = None
             ) -> List[Tensor]:
    """``repeat``: one batch per image, the image copied; ``mixed``: consecutive distinct images of
    ``mixed_images`` (default ``images``), cycling."""
    n = images.shape[0]
    if protocol == "repeat":
        return [images[i:i + 1].expand(batch_size, -1, -1, -1).contiguous() for i in range(n)]
    images = images if mixed_images is None else mixed_images
    n = images.shape[0]
    order = itertools.cycle(range(n))
    count = max(1, n // batch_size) if n >= batch_size else n
    return [images[[next(order) for _ in range(batch_size)]] for _ in range(count)]


_STATS_BATCHES = 4  # batches of a fresh mixed pool the token statistics come from
_HOST_CALLS = 5  # host-timed calls of each (setting, protocol), first round


def random_crops(images: Tensor, per_image: int, size: int, seed: int = 0) -> Tensor:
    """``per_image`` distinct ``size``² crops of each image ``[N, 3, H, W]`` (H, W >= size): rescaled by 1-1.6×, cut
    at a random offset, flipped half the time (seeded): batches that differ as an evaluation's do."""
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for image in images:
        for _ in range(per_image):
            scale = 1.0 + 0.6 * float(torch.rand((), generator=generator))
            side = round(min(image.shape[-2:]) * scale)
            scaled = F.interpolate(image[None], size=(side, side), mode="bilinear", align_corners=False)
            top, left = (int(torch.randint(0, side - size + 1, (), generator=generator)) for _ in range(2))
            crop = scaled[..., top:top + size, left:left + size]
            crops.append(crop.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop)
    return torch.cat(crops)


def fresh_mixed_batches(warmup: int, iters: int, rounds: int) -> int:
    """Distinct mixed batches :func:`benchmark_net` uses with ``mixed_images``: every warm-up and timed call (and
    the host-time and overlapped calls of the first round) gets a batch it has not seen, plus the statistics'."""
    rounds = min(rounds, iters)
    round_iters = -(-iters // rounds)
    warmups = warmup + (rounds - 1) * max(1, warmup // rounds)
    return warmups + rounds * round_iters + _HOST_CALLS + round_iters + _STATS_BATCHES


def _token_summary(stats_per_batch: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    per_layer = [sum((s["tokens_per_layer"][i] for s in stats_per_batch), [])
                 for i in range(len(stats_per_batch[0]["tokens_per_layer"]))]
    return {"initial_tokens": stats_per_batch[0]["initial_tokens"],
            "mean_tokens_per_layer": [float(np.mean(layer)) for layer in per_layer],
            "min_tokens_per_layer": [int(min(layer)) for layer in per_layer],
            "max_tokens_per_layer": [int(max(layer)) for layer in per_layer]}


def static_shapes(algm: ALGMConfig) -> bool:
    """Whether every forward at one input size has the same token counts (no data-dependent shapes): the plain
    model and fixed merge levels. Such settings compile to one graph and can be captured as CUDA graphs."""
    return not algm.data_dependent


def _graphed(forward: Callable[[Tensor], Any], example: Tensor) -> Callable[[Tensor], Any]:
    """``forward`` captured as a CUDA graph: each call copies the batch into the graph's input and replays it (the
    output tensor is reused). Call inside the autocast / no_grad context the replays run in."""
    static_input = example.clone()
    stream = torch.cuda.Stream(example.device)
    stream.wait_stream(torch.cuda.current_stream(example.device))
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            forward(static_input)
    torch.cuda.current_stream(example.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = forward(static_input)

    def replay(batch: Tensor) -> Any:
        static_input.copy_(batch)
        graph.replay()
        return static_output

    replay.graph = graph  # keeps the graph (and its memory pool) alive with the function
    return replay


def _check_arguments(*, precision: str, protocols: Sequence[str], output: str, iters: int, rounds: int,
                     cuda_graphs: bool, device: torch.device) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    precision_dtype(precision)  # names the choices if it is none of them
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; use {PROTOCOLS}")
    if rounds < 1 or iters < 1:
        raise ValueError(f"need rounds >= 1 and iters >= 1, got rounds={rounds}, iters={iters}")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs CUDA images, got device {device}")


def _prepare_setting(net: nn.Module, name: str, algm: ALGMConfig, images: Tensor, batches: Mapping[str, List[Tensor]],
                     *, output: str, compile_mode: Optional[str], cuda_graphs: bool, latency: bool, warmup: int,
                     iters: int, fresh: bool) -> Tuple[Dict[str, Any], Callable[[Tensor], Any]]:
    """A setting's report entry (kept tokens per protocol, batch-1 latency) and the forward its rounds time
    (compiled or captured as a CUDA graph where its shapes are static). Run under the benchmark's autocast."""
    net.set_algm(algm)
    forward = net.predict_labels if output == "labels" else net.forward
    static = static_shapes(algm)
    compiled = compile_mode is not None and static
    if compiled:
        forward = torch.compile(forward, mode=compile_mode, dynamic=False)
    graphed = cuda_graphs and static
    entry: Dict[str, Any] = {"algm": repr(algm), "protocols": {},
                             "compiled": compile_mode if compiled else None, "cuda_graph": graphed}
    for protocol, protocol_batches in batches.items():
        stats = []
        # fresh mixed batches: the stats come from the pool's last batches, which no timed call uses
        for batch in protocol_batches[-_STATS_BATCHES:] if fresh and protocol == "mixed" else protocol_batches:
            net(batch)
            stats.append(net.merge_stats)
        entry["protocols"][protocol] = {"tokens": _token_summary(stats)}
    if latency:
        singles = itertools.cycle([images[i:i + 1] for i in range(images.shape[0])])
        # Warm up on every image at least once: token counts (shapes) differ per image, and a shape's
        # first run is not the steady state.
        entry["latency_ms"] = measure_throughput(
            lambda _: forward(next(singles)), None, warmup=max(warmup // 5, 2 * images.shape[0]),
            iters=max(iters // 2, 1), device=images.device, batch_size=1,
            desc=f"{name}: latency")["ms_per_batch_median"]
    return entry, _graphed(forward, next(iter(batches.values()))[0]) if graphed else forward


def _protocol_timing(times: CallTimes, inputs: Optional[int]) -> Dict[str, Any]:
    """The report's timing of one (setting, protocol). Over ``inputs`` batches timed equally often, images/s is the
    batch size over the mean of each input's median time; ``inputs`` None (every call a new batch): over the median
    of all calls."""
    all_ms = np.asarray(times.ms_per_call, dtype=np.float64)
    median_ms = float(np.median(all_ms))
    if inputs is None:
        per_input, input_mean_ms = [], median_ms
    else:  # every round made whole passes: call j ran input j % inputs
        per_input = [float(np.median(all_ms[i::inputs])) for i in range(inputs)]
        input_mean_ms = float(np.mean(per_input))
    return {"host_ms_per_batch": times.host_ms,
            "images_per_second": images_per_second(times.batch_size, input_mean_ms),
            "ms_per_batch_by_input": per_input, "ms_per_batch_input_mean": input_mean_ms,
            "ms_per_batch_median": median_ms, "ms_per_batch_mean": float(all_ms.mean()),
            "ms_per_batch_p90": float(np.percentile(all_ms, 90)), "ms_per_image": median_ms / times.batch_size,
            "ms_per_batch_rounds": times.round_medians, "iters": int(all_ms.size),
            "peak_memory_mb": times.peak_memory_mb,
            "overlapped_images_per_second": times.overlapped_images_per_second}


def _speed_ratios(results: Mapping[str, Any], protocols: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Each setting's im/s over the baseline's per protocol, and its repeat over mixed mean input times (both
    protocols averaged over the same images)."""
    ratios = {}
    if "baseline" in results:
        base = results["baseline"]["protocols"]
        ratios = {name: {p: r["protocols"][p]["images_per_second"] / base[p]["images_per_second"] for p in protocols}
                  for name, r in results.items()}
    adaptivity = {}
    if set(PROTOCOLS) <= set(protocols):
        adaptivity = {name: r["protocols"]["repeat"]["ms_per_batch_input_mean"]
                      / r["protocols"]["mixed"]["ms_per_batch_input_mean"] for name, r in results.items()}
    return ratios, adaptivity


def benchmark_net(net: nn.Module, images: Tensor, *, settings: Mapping[str, ALGMConfig], batch_size: int = 32,
                  precision: str = "bf16", protocols: Sequence[str] = PROTOCOLS, warmup: int = 50,
                  iters: int = 100, rounds: int = 5, latency: bool = True, flops_images: int = 4,
                  progress: bool = False, output: str = "logits", compile_mode: Optional[str] = None,
                  cuda_graphs: bool = False, block_graphs: Optional[bool] = None, graph_buckets: int = 16,
                  mixed_images: Optional[Tensor] = None) -> Dict[str, Any]:
    """Measure ``net`` (a network with an ALGM ``backbone``, ``set_algm`` and ``merge_stats``: Segmenter, SETR,
    SegViT) on normalized ``images``; the timing is :func:`~algm_d2.evaluation.throughput.time_interleaved`'s.

    ``output`` "logits" times ``net(images)`` (full-resolution class logits), "labels" times ``net.predict_labels``
    (the evaluation's argmax labels, fused decode tail). ``compile_mode`` (e.g. "default", "max-autotune",
    "reduce-overhead") compiles the forward of settings with :func:`static_shapes` (``dynamic=False``);
    ``cuda_graphs`` (CUDA only) captures those settings' forwards as CUDA graphs and replays them. Settings with
    data-dependent token counts run eagerly either way (their merges sync with the host). ``block_graphs``: whether
    the backbone replays its segments between merges' host syncs as CUDA graphs (None: the model's own setting, on by
    default; inside a whole-forward graph or compile they run inline; ``graph_buckets``: row buckets per doubling of
    a packed total, the model's default 16). ``mixed_images``: a pool of distinct images for the mixed protocol,
    each batch of which is used once per setting (as in an evaluation, no batch comes back: token counts and
    shapes are new each call); it must hold :func:`fresh_mixed_batches` batches. Without it the mixed protocol
    cycles through ``images``.

    Every timed call is wall clock from before the call to the synchronize after it (the release's protocol: the
    host work a call cannot overlap is counted); the first round also times back-to-back calls between CUDA events
    ("overlapped_images_per_second", a second figure that hides that host work). The timed iterations are spread
    over ``rounds`` rounds that visit every (setting, protocol) in turn, so slow
    drifts of the machine (clocks, temperature, other tenants) hit all settings alike. Every round (warm-up
    included) makes whole passes over the protocol's inputs (the repeat protocol: one batch per image), so each
    input is timed equally often (``iters`` rounds up). A protocol's images/s is the batch size over the mean, over
    its inputs, of each input's median batch time ("ms_per_batch_by_input"; for the repeat protocol the average over
    the images, robust to the occasional slow call); each entry also reports the median over all its iterations
    and the median of each round ("ms_per_batch_rounds": their spread is the run-to-run noise; ``rounds`` is capped
    at ``iters``). "host_ms_per_batch" is the time the host takes to issue one forward.

    Returns {"config": {...}, "results": {setting: {"protocols": {protocol: throughput + tokens}, "latency_ms",
    "gflops_per_image", "compiled", "cuda_graph"}}, "ratios": {setting: {protocol: im/s ÷ baseline im/s}},
    "mixed_over_repeat": {setting: mixed im/s ÷ repeat im/s, both averaged over the same images}}.
    """
    device = images.device
    _check_arguments(precision=precision, protocols=protocols, output=output, iters=iters, rounds=rounds,
                     cuda_graphs=cuda_graphs, device=device)
    rounds = min(rounds, iters)
    dtype = precision_dtype(precision)
    net.eval()
    batches = {protocol: _batches(images, batch_size, protocol, mixed_images) for protocol in protocols}
    fresh = mixed_images is not None and "mixed" in protocols
    if fresh:
        needed = fresh_mixed_batches(warmup, iters, rounds)
        if len(batches["mixed"]) < needed:
            raise ValueError(f"mixed_images: {len(batches['mixed'])} batches of {batch_size}, but warmup={warmup}, "
                             f"iters={iters}, rounds={rounds} use {needed} distinct ones "
                             f"({needed * batch_size} images)")
    backbone = net.backbone
    own_graphs = backbone.block_graphs  # the model's own setting, restored at the end
    if block_graphs is None:
        block_graphs = own_graphs is not None
    backbone.use_cuda_graphs(block_graphs, buckets_per_octave=graph_buckets)
    results: Dict[str, Any] = {}
    calls: Dict[Tuple[str, str], TimedCall] = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for name, algm in settings.items():
            results[name], runner = _prepare_setting(
                net, name, algm, images, batches, output=output, compile_mode=compile_mode, cuda_graphs=cuda_graphs,
                latency=latency, warmup=warmup, iters=iters, fresh=fresh)
            for protocol in protocols:  # a fresh mixed batch is used once per setting: each walks the pool anew
                calls[name, protocol] = TimedCall(
                    fn=runner, batches=iter(batches[protocol]) if fresh and protocol == "mixed" else batches[protocol],
                    batch_size=batch_size, select=functools.partial(net.set_algm, algm), label=f"{name} / {protocol}")
        graphs = backbone.block_graphs
        captures = {"before_rounds": graphs.captures} if graphs is not None else None
        timings = time_interleaved(calls, warmup=warmup, iters=iters, rounds=rounds, device=device, overlapped=True,
                                   host_calls=_HOST_CALLS, progress=progress)
        for (name, protocol), times in timings.items():
            inputs = None if fresh and protocol == "mixed" else len(batches[protocol])
            results[name]["protocols"][protocol].update(_protocol_timing(times, inputs))
    calls.clear()  # frees the graphs' memory pools
    if captures is not None:  # block graphs captured during the timed rounds (the warm-up passes included)
        captures.update(after_rounds=graphs.captures, kept=len(graphs))
    backbone.block_graphs = own_graphs
    for name in settings:
        net.set_algm(settings[name])
        counted = [count_gflops(net, (images[i:i + 1],))["gflops"] for i in range(min(flops_images, len(images)))]
        results[name]["gflops_per_image"] = float(np.mean(counted)) if counted else None
        logger.info("%s: %s", name, {p: round(v["images_per_second"], 1)
                                     for p, v in results[name]["protocols"].items()})
    net.set_algm(OFF)
    ratios, adaptivity = _speed_ratios(results, protocols)
    return {"config": {"batch_size": batch_size, "precision": precision, "protocols": list(protocols),
                       "output": output, "compile_mode": compile_mode, "cuda_graphs": cuda_graphs,
                       "block_graphs": block_graphs, "graph_buckets": graph_buckets,
                       "block_graph_captures": captures,
                       "warmup": warmup, "iters": iters, "rounds": rounds, "num_images": int(images.shape[0]),
                       "image_size": list(images.shape[-2:]), "device": _device_name(device)},
            "results": results, "ratios": ratios, "mixed_over_repeat": adaptivity}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def benchmark_table(report: Mapping[str, Any], local_layer: int = 1, global_layer: int = 5) -> str:
    """Markdown: one row per (setting, protocol) with im/s, ratio to baseline, GFLOPs, tokens after the ALGM layers."""
    rows = ["| setting | protocol | images/s (synchronized) | × baseline | GFLOPs/img | tokens after L{} | "
            "tokens after L{} | final tokens | latency b=1 (ms) | host ms/batch | peak MB | "
            "images/s (overlapped, GPU events) |".format(local_layer, global_layer),
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report["results"].items():
        for protocol, values in entry["protocols"].items():
            tokens = values["tokens"]["mean_tokens_per_layer"]
            ratio = report["ratios"].get(name, {}).get(protocol)
            peak = values.get("peak_memory_mb")
            host = values.get("host_ms_per_batch")
            overlapped = values.get("overlapped_images_per_second")
            rows.append("| {} | {} | {:.1f} | {} | {} | {:.0f} | {:.0f} | {:.0f} | {} | {} | {} | {} |".format(
                name, protocol, values["images_per_second"], f"{ratio:.2f}" if ratio else "—",
                f"{entry['gflops_per_image']:.3g}" if entry.get("gflops_per_image") is not None else "—",
                tokens[local_layer - 1] if len(tokens) >= local_layer else float("nan"),
                tokens[global_layer - 1] if len(tokens) >= global_layer else float("nan"), tokens[-1],
                f"{entry['latency_ms']:.2f}" if entry.get("latency_ms") is not None else "—",
                f"{host:.2f}" if host is not None else "—", f"{peak:.0f}" if peak else "—",
                f"{overlapped:.1f}" if overlapped else "—"))
    return "\n".join(rows)


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                          iters: int = 20) -> float:
    """The measured dense matmul rate (TFLOP/s, 2 FLOPs per multiply-add) of ``size``³ products on ``device``:
    the ceiling model FLOP utilisation is quoted against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = measure_throughput(lambda _: a @ b, None, warmup=5, iters=iters, device=device, batch_size=1)
    return 2 * size ** 3 / (timing["ms_per_batch_median"] / 1000) / 1e12


def encoder_utilisation(encoder: nn.Module, images: Tensor, *, precision: str = "bf16", warmup: int = 10,
                        iters: int = 30) -> Dict[str, float]:
    """The plain ViT encoder's achieved TFLOP/s (analytic multiply-adds ×2, attention included) and its fraction of
    the measured matmul ceiling in the same dtype."""
    from .flop_count import vit_encoder_macs  # noqa: PLC0415 - only here

    dtype = precision_dtype(precision) or torch.float32
    device = images.device
    patch = encoder.patch_size[0]
    macs = vit_encoder_macs(num_patches=(images.shape[-2] // patch) * (images.shape[-1] // patch),
                            embed_dim=encoder.embed_dim, depth=encoder.depth,
                            mlp_hidden_dim=encoder.blocks[0].mlp.fc1.out_features, patch_size=patch,
                            num_prefix_tokens=encoder.num_prefix_tokens, batch_size=images.shape[0])
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        timing = measure_throughput(lambda _: encoder(images, algm=OFF), None, warmup=warmup, iters=iters,
                                    device=device, batch_size=images.shape[0])
    achieved = 2 * macs / (timing["ms_per_batch_median"] / 1000) / 1e12
    ceiling = matmul_ceiling_tflops(device, dtype)
    return {"encoder_tflops": achieved, "matmul_ceiling_tflops": ceiling, "utilisation": achieved / ceiling,
            "encoder_images_per_second": timing["images_per_second"]}
