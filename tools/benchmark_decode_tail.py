#!/usr/bin/env python
"""The evaluation's decode tail — bilinear upsample of class logits + argmax — plain vs fused, against its memory
floor (bytes of logits read + labels written, at the device's measured copy bandwidth).

  python tools/benchmark_decode_tail.py --out decode_tail.json                 # 32×150×32² → 512², on a GPU
  python tools/benchmark_decode_tail.py --device cpu --batch 2 --classes 6     # the reference alone
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algm_d2.evaluation import measure_throughput  # noqa: E402
from algm_d2.modeling.ops.upsample_argmax import upsample_argmax  # noqa: E402


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--grid", type=int, default=32, help="logit side (512 / patch 16)")
    parser.add_argument("--size", type=int, default=512, help="output side")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="decode_tail.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = (args.size, args.size)
    report = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "shape": [args.batch, args.classes, args.grid, args.grid], "size": list(size), "results": {}}
    copy = torch.empty(1 << 28, device=device)  # 1 GiB: read + write per copy
    copy_ms = measure_throughput(lambda _: copy.clone(), None, warmup=3, iters=10, device=device,
                                 batch_size=1)["ms_per_batch_median"]
    bandwidth = 2 * copy.numel() * 4 / (copy_ms / 1000)
    copy = None  # free the 1 GiB before the measurements
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        logits = torch.randn(args.batch, args.classes, args.grid, args.grid, device=device, dtype=dtype)
        floor_ms = (logits.numel() * logits.element_size() + args.batch * size[0] * size[1] * 8) / bandwidth * 1000
        methods = {"interpolate+argmax": lambda _: F.interpolate(logits, size=size, mode="bilinear",
                                                                  align_corners=False).argmax(1)}
        if device.type == "cuda":
            methods["fused"] = lambda _: upsample_argmax(logits, size)
        entry = {"floor_ms": floor_ms}
        labels = {}
        for method, fn in methods.items():
            timing = measure_throughput(fn, None, warmup=5, iters=args.iters, device=device, batch_size=args.batch)
            labels[method] = fn(None)
            entry[method] = {"ms": timing["ms_per_batch_median"], "x_floor": timing["ms_per_batch_median"] / floor_ms,
                             "peak_memory_mb": timing["peak_memory_mb"]}
        if "fused" in labels:
            entry["identical_fraction"] = float((labels["fused"] == labels["interpolate+argmax"]).float().mean())
        report["results"][name] = entry
    report["copy_bandwidth_gb_s"] = bandwidth / 1e9
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
