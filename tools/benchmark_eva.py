#!/usr/bin/env python
"""EVA + ViT-Adapter + Mask2Former forward per crop, baseline vs ALGM at fixed merge levels (random weights).

Per setting: ms per crop split into ViT blocks / adapter / pixel decoder / transformer decoder (CUDA events at the
section boundaries, median over iterations), GFLOPs per crop (fvcore multiply-adds, attention counted, by part),
kept tokens and peak memory.

  python tools/benchmark_eva.py --config-file configs/ade20k/eva.yaml --device cuda --precision bf16 --out eva.json
  # the same code path on a tiny model, on the CPU
  python tools/benchmark_eva.py --config-file configs/demo/eva_tiny_algm.yaml --device cpu --size 128 --iters 2
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algm_d2.config import get_cfg  # noqa: E402
from algm_d2.evaluation import count_gflops  # noqa: E402
from algm_d2.merge import OFF, ALGMConfig, FixedLevel  # noqa: E402
from algm_d2.modeling import build_model  # noqa: E402
from algm_d2.modeling.ops.msda import MSDeformAttn  # noqa: E402

logger = logging.getLogger("benchmark_eva")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def settings(local_layer: int, global_layer: int) -> Dict[str, ALGMConfig]:
    """Baseline and ALGM at fixed levels (fractions of the CLAP windows / GBM candidates merged)."""
    def level(local: float, global_: float) -> ALGMConfig:
        return ALGMConfig(local_layer=local_layer, global_layer=global_layer,
                          local_threshold=FixedLevel(fraction=local), global_threshold=FixedLevel(fraction=global_))
    return {"baseline": OFF, "algm_25_30": level(0.25, 0.30), "algm_50_50": level(0.5, 0.5)}


class SectionTimer:
    """Records events at section boundaries on the current stream (CUDA) or wall-clock times (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: List[tuple] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def durations(self) -> Dict[str, float]:
        """ms spent between each mark and the next, summed by the label of the section's start."""
        if self.cuda:
            torch.cuda.synchronize()
        out: Dict[str, float] = defaultdict(float)
        for (label, start), (_, end) in zip(self.marks, self.marks[1:]):
            out[label] += start.elapsed_time(end) if self.cuda else (end - start) * 1000.0
        return dict(out)


@contextmanager
def sections(net: torch.nn.Module, timer: SectionTimer) -> Iterator[None]:
    """Mark: ViT blocks (each ``run_blocks`` call) vs the adapter around them; pixel decoder; transformer decoder
    (with the prediction heads and the semantic inference after it)."""
    backbone, head = net.backbone, net.decode_head
    run_blocks = backbone.run_blocks

    def timed_blocks(*args: Any, **kwargs: Any) -> None:
        timer.mark("vit_blocks")
        run_blocks(*args, **kwargs)
        timer.mark("adapter")

    def label_hooks(module: torch.nn.Module, label: str, after: str) -> List[Any]:
        return [module.register_forward_pre_hook(lambda *_: timer.mark(label)),
                module.register_forward_hook(lambda *_: timer.mark(after))]

    backbone.run_blocks = timed_blocks
    # the head runs the decoder layers itself after the pixel decoder: everything after it is the decoder
    hooks = label_hooks(head.pixel_decoder, "pixel_decoder", "transformer_decoder")
    try:
        yield
    finally:
        del backbone.run_blocks
        for hook in hooks:
            hook.remove()


def time_forward(net: torch.nn.Module, images: torch.Tensor, warmup: int, iters: int,
                 autocast: Callable[[], Any]) -> Dict[str, Any]:
    device = images.device
    with torch.no_grad(), autocast():
        for _ in range(warmup):
            net(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        runs: List[Dict[str, float]] = []
        for _ in range(iters):
            timer = SectionTimer(device)
            with sections(net, timer):
                timer.mark("adapter")
                net(images)
                timer.mark("end")
            runs.append(timer.durations())
    per_crop = images.shape[0]
    labels = sorted({k for r in runs for k in r})
    split = {k: float(np.median([r.get(k, 0.0) for r in runs])) / per_crop for k in labels}
    total = float(np.median([sum(r.values()) for r in runs])) / per_crop
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"ms_per_crop": total, "ms_per_crop_by_part": split, "peak_memory_mb": peak}


def gflops_by_part(net: torch.nn.Module, image: torch.Tensor) -> Dict[str, Any]:
    """fvcore multiply-adds by part; deformable sampling (grid_sample) is not counted (its linears are)."""
    msda = [m for m in net.modules() if isinstance(m, MSDeformAttn)]
    impls = [m.impl for m in msda]
    for m in msda:  # the jit trace cannot enter the Triton kernel's autograd function
        m.impl = "reference"
    names = ("backbone", "backbone.blocks", "decode_head", "decode_head.pixel_decoder")
    try:
        counted = count_gflops(net, (image,), module_names=names)
    finally:
        for m, impl in zip(msda, impls):
            m.impl = impl
    part = counted["by_name"]
    parts = {"vit_blocks": part["backbone.blocks"], "adapter": part["backbone"] - part["backbone.blocks"],
             "pixel_decoder": part["decode_head.pixel_decoder"],
             "transformer_decoder_and_heads": part["decode_head"] - part["decode_head.pixel_decoder"],
             "other": counted["gflops"] - part["backbone"] - part["decode_head"]}
    return {"gflops_per_crop": counted["gflops_per_image"], "gflops_by_part": parts,
            "unsupported_ops": counted.get("unsupported_ops")}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/ade20k/eva.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--size", type=int, default=896, help="crop side (EVA: 896)")
    parser.add_argument("--batch", type=int, default=1, help="crops per forward")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--global-layer", type=int, default=None, help="default: MODEL.ALGM.GLOBAL_LAYER")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--out", default="benchmark_eva.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", args.device] + list(args.opts))
    global_layer = args.global_layer or cfg.MODEL.ALGM.GLOBAL_LAYER
    depth = cfg.MODEL.BACKBONE.DEPTH
    local_layer = cfg.MODEL.ALGM.LOCAL_LAYER
    if local_layer is None or global_layer is None or not 1 <= local_layer < global_layer <= depth:  # before building
        parser.error(f"MODEL.ALGM.LOCAL_LAYER {local_layer} and the GBM layer {global_layer} "
                     f"(--global-layer or MODEL.ALGM.GLOBAL_LAYER) must satisfy 1 <= local < global <= "
                     f"MODEL.BACKBONE.DEPTH ({depth}) in {args.config_file}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):  # initialise the 1.3 B parameters where they live
        net = build_model(cfg).net.eval()
    dtype = PRECISIONS[args.precision]

    def autocast():  # noqa: ANN202
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    report: Dict[str, Any] = {"config_file": args.config_file, "precision": args.precision, "size": args.size,
                              "batch": args.batch, "device": torch.cuda.get_device_name() if device.type == "cuda"
                              else "cpu", "command": " ".join(sys.argv), "results": {}}
    for name, algm in settings(cfg.MODEL.ALGM.LOCAL_LAYER, global_layer).items():
        net.set_algm(algm)
        entry = time_forward(net, images, args.warmup, args.iters, autocast)
        entry["tokens_per_layer"] = net.merge_stats["tokens_per_layer"]
        entry["final_tokens"] = entry["tokens_per_layer"][-1][0] if entry["tokens_per_layer"] else None
        if not args.no_flops:
            with autocast():
                entry.update(gflops_by_part(net, images[:1]))
        report["results"][name] = entry
        logger.info("%s: %.2f ms/crop %s", name, entry["ms_per_crop"],
                    {k: round(v, 2) for k, v in entry["ms_per_crop_by_part"].items()})
    Path(args.out).write_text(json.dumps(report, indent=1))
    base = report["results"]["baseline"]["ms_per_crop"]
    print("| setting | final tokens | ms/crop | × baseline speed | " + " | ".join(
        f"{k} ms" for k in report["results"]["baseline"]["ms_per_crop_by_part"]) + " | GFLOPs/crop | peak MB |")
    for name, entry in report["results"].items():
        parts = " | ".join(f"{v:.2f}" for v in entry["ms_per_crop_by_part"].values())
        print(f"| {name} | {entry['final_tokens']} | {entry['ms_per_crop']:.2f} | {base / entry['ms_per_crop']:.2f} | "
              f"{parts} | {entry.get('gflops_per_crop', float('nan')):.4g} | {entry['peak_memory_mb'] or 0:.0f} |")


if __name__ == "__main__":
    main()
