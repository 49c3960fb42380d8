#!/usr/bin/env python
"""The evaluation's decode tail — bilinear upsampling of class logits + argmax over classes — against its memory
floor: (a) ``F.interpolate(...).argmax(1)``, (b) the fused ``upsample_argmax``; with ``--upsample`` also the
full-resolution logits alone, ``F.interpolate`` vs ``upsample_bilinear`` (floor: logits read + written).

Floor = (bytes of logits read + bytes of int64 labels written) / the device's copy bandwidth, measured as
(bytes read + bytes written) / time of a ``dst.copy_(src)`` of ``--copy-mb`` (1 GiB on CUDA). Times are medians of
per-call CUDA events after warm-up calls (host launch time included: a single call of a ~0.1 ms kernel waits for its
launch) and, on CUDA, GPU times of calls queued behind a spin kernel (kernel time only); peak memory is the most allocated above the inputs during one call,
labels included. ``identical`` compares (a) and (b) label by label and must be 1.0.

Logits: ``random`` (i.i.d. normal: most classes stay candidates, the fused kernel's worst case short of ties),
``smooth`` (4 × a bilinear upsampling of normal logits from a grid 8× coarser, plus N(0, 0.5²) noise: a few classes
compete per region, like a trained head's), ``ties`` (every class within two units in the last place of one map:
the labels depend on every rounding, so (b) matches (a) only with PyTorch's exact arithmetic). Layouts: ``nchw``
(contiguous) and ``nhwc`` (channels last, as the Segmenter head emits its grid; PyTorch then runs another kernel).

  python tools/benchmark_decode_tail.py --out decode_tail.json            # 32×150×32² → 512², on a GPU
  python tools/benchmark_decode_tail.py --upsample --kinds smooth --dtypes fp32,bf16,fp16 --out upsample.json
  python tools/benchmark_decode_tail.py --batch 8 --classes 150 --grid 128x128 --size 512x512   # Mask2Former-like
  python tools/benchmark_decode_tail.py --device cpu --out /tmp/d.json     # tiny shapes, the reference alone
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:  # torch loads after the arguments are parsed, so that --help answers at once
    import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # names of torch dtypes
KINDS = ("random", "smooth", "ties")
LAYOUTS = ("nchw", "nhwc")
# batch, classes, logit grid, output size
DEFAULTS = {"cuda": (32, 150, (32, 32), (512, 512)), "cpu": (2, 6, (8, 8), (64, 64))}


def _pair(text: str) -> Tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


def make_logits(kind: str, shape: Tuple[int, int, int, int], dtype: torch.dtype, layout: str,
                device: torch.device) -> torch.Tensor:
    """Seeded on the CPU (the same logits on every device), then moved."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    b, k, h, w = shape
    if kind == "random":
        logits = torch.randn(shape, generator=generator).to(dtype)
    elif kind == "smooth":
        coarse = torch.randn(b, k, max(1, h // 8), max(1, w // 8), generator=generator)
        logits = 4 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        logits = (logits + 0.5 * torch.randn(shape, generator=generator)).to(dtype)
    else:
        logits = torch.randn(b, 1, h, w, generator=generator).to(dtype).expand(shape).contiguous()
        for step in torch.randint(-1, 2, (2, *shape), generator=generator):
            away = torch.where(step > 0, float("inf"), float("-inf")).to(dtype)
            logits = torch.where(step == 0, logits, torch.nextafter(logits, away))
    if layout == "nhwc":
        logits = logits.contiguous(memory_format=torch.channels_last)
    return logits.to(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def gpu_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, calls: int = 10) -> Optional[float]:
    """GPU time per call without the host's launch time: ``calls`` calls are queued behind a ~5 ms spin kernel, so
    the events around them time only the kernels (as in an evaluation, where the tail is queued after the forward).
    Median over ``iters // calls`` repetitions; None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(max(1, iters // calls)):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(10_000_000)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def peak_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Most memory allocated above what was live before one call (its output included); None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def copy_bandwidth(device: torch.device, megabytes: int, warmup: int, iters: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    import torch

    src = torch.empty(megabytes * 2 ** 20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * 4 / (ms / 1e3)


def upsample_row(logits: torch.Tensor, size: Tuple[int, int], bandwidth: float, device: torch.device,
                 args: argparse.Namespace) -> Dict[str, Any]:
    """Full-resolution logits: time of each side, × its floor, and whether the values are bit-identical."""
    import torch.nn.functional as F

    from algm_d2.modeling.ops.upsample_argmax import upsample_bilinear

    plain = partial(F.interpolate, logits, size=size, mode="bilinear", align_corners=False)
    ours = partial(upsample_bilinear, logits, size, impl="triton" if device.type == "cuda" else "reference")
    expected, got = plain(), ours()
    floor_ms = (logits.numel() + expected.numel()) * logits.element_size() / bandwidth * 1e3
    row: Dict[str, Any] = {"floor_ms": floor_ms,
                           "identical": bool(((got == expected) | (got.isnan() & expected.isnan())).all())}
    for name, call in (("interpolate", plain), ("upsample_bilinear", ours)):
        ms = median_ms(call, device, args.warmup, args.iters)
        row[name] = {"ms": ms, "x_floor": ms / floor_ms}
    return row


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Every (dtype, layout, logits) row; ``args`` as :func:`main` parses them."""
    import torch
    import torch.nn.functional as F

    from algm_d2.modeling.ops.upsample_argmax import upsample_argmax

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch, classes, grid, size = DEFAULTS[device.type]
    batch, classes = args.batch or batch, args.classes or classes
    grid = _pair(args.grid) if args.grid else grid
    size = _pair(args.size) if args.size else size
    shape = (batch, classes, *grid)
    bandwidth = copy_bandwidth(device, args.copy_mb or (1024 if device.type == "cuda" else 64), args.warmup,
                               args.iters)
    fused_impl = "triton" if device.type == "cuda" else "reference"
    methods = {
        "interpolate+argmax": lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False).argmax(1),
        "fused": lambda x: upsample_argmax(x, size, impl=fused_impl),
    }
    rows = []
    for dtype_name in args.dtypes.split(","):
        for layout in args.layouts.split(","):
            for kind in args.kinds.split(","):
                logits = make_logits(kind, shape, getattr(torch, DTYPES[dtype_name]), layout, device)
                floor_ms = (logits.numel() * logits.element_size() + batch * size[0] * size[1] * 8) / bandwidth * 1e3
                row: Dict[str, Any] = {"dtype": dtype_name, "layout": layout, "logits": kind, "floor_ms": floor_ms}
                labels = {}
                for name, method in methods.items():
                    call = partial(method, logits)
                    ms = median_ms(call, device, args.warmup, args.iters)
                    gpu = gpu_ms(call, device, args.warmup, args.iters)
                    row[name] = {"ms": ms, "x_floor": ms / floor_ms, "gpu_ms": gpu,
                                 "gpu_x_floor": None if gpu is None else gpu / floor_ms, "peak_mb": peak_mb(call, device)}
                    labels[name] = call()
                mismatched = int((labels["fused"] != labels["interpolate+argmax"]).sum())
                row["mismatched_labels"] = mismatched
                row["identical"] = 1.0 - mismatched / labels["fused"].numel()
                if args.upsample:
                    row["upsample"] = upsample_row(logits, size, bandwidth, device, args)
                rows.append(row)
    return {
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "fused_impl": fused_impl,
        "shape": list(shape),
        "size": list(size),
        "warmup": args.warmup,
        "iters": args.iters,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "rows": rows,
    }


def markdown(report: Dict[str, Any]) -> str:
    b, k, h, w = report["shape"]
    lines = [f"{report['device']}: {b}×{k}×{h}×{w} → {report['size'][0]}×{report['size'][1]}, fused = "
             f"{report['fused_impl']}, copy bandwidth {report['copy_bandwidth_gb_s']:.0f} GB/s (read + write)", "",
             "ms: one call between CUDA events (host launch included); GPU µs: calls queued behind a spin kernel "
             "(kernel time only)", "",
             "| dtype | layout | logits | floor µs | interpolate+argmax ms | × floor | peak MB | fused ms | fused GPU µs "
             "| GPU × floor | peak MB | identical |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def peak(value: Optional[float]) -> str:
        return "–" if value is None else f"{value:.0f}"

    def gpu(value: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
        return "–" if value is None else f"{value * scale:.{digits}f}"

    for row in report["rows"]:
        plain, fused = row["interpolate+argmax"], row["fused"]
        lines.append(f"| {row['dtype']} | {row['layout']} | {row['logits']} | {row['floor_ms'] * 1e3:.1f} "
                     f"| {plain['ms']:.3f} | {plain['x_floor']:.1f} | {peak(plain['peak_mb'])} "
                     f"| {fused['ms']:.3f} | {gpu(fused['gpu_ms'], 1e3)} | {gpu(fused['gpu_x_floor'], digits=2)} "
                     f"| {peak(fused['peak_mb'])} | {row['identical']:.7f} ({row['mismatched_labels']} differ) |")
    upsampled = [row for row in report["rows"] if "upsample" in row]
    if upsampled:
        lines += ["", "| dtype | layout | logits | floor ms | interpolate ms | × floor | upsample_bilinear ms | × floor "
                  "| identical values |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for row in upsampled:
            up = row["upsample"]
            lines.append(f"| {row['dtype']} | {row['layout']} | {row['logits']} | {up['floor_ms']:.3f} "
                         f"| {up['interpolate']['ms']:.3f} | {up['interpolate']['x_floor']:.1f} "
                         f"| {up['upsample_bilinear']['ms']:.3f} | {up['upsample_bilinear']['x_floor']:.2f} "
                         f"| {up['identical']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=int, help="default 32 (cuda) / 2 (cpu)")
    parser.add_argument("--classes", type=int, help="default 150 (cuda) / 6 (cpu)")
    parser.add_argument("--grid", help="logit grid HxW, default 32x32 (cuda) / 8x8 (cpu)")
    parser.add_argument("--size", help="output HxW, default 512x512 (cuda) / 64x64 (cpu)")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--copy-mb", type=int, help="copy size for the bandwidth, default 1024 (cuda) / 64 (cpu)")
    parser.add_argument("--upsample", action="store_true",
                        help="also time the full-resolution logits alone (F.interpolate vs upsample_bilinear)")
    parser.add_argument("--out", default="decode_tail.json")
    args = parser.parse_args(argv)
    report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(markdown(report))


if __name__ == "__main__":
    main()
