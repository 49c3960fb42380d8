#!/usr/bin/env python
"""EVA + ViT-Adapter + Mask2Former forward per crop, baseline vs ALGM (the config's thresholds, both batch policies,
both stages scoring but merging nothing, fixed levels), random weights.

Headline: wall clock per forward from before the call to the synchronize after it, every call (the release's
protocol), each call on a batch of crops it has not seen (random crops of the photos in ``--images``; noise
without), median over iterations. Per
setting also: ms per crop split into ViT blocks / adapter / pixel decoder / transformer decoder (CUDA events at the
section boundaries, a second figure), GFLOPs per crop at the tokens the first batch keeps (fvcore multiply-adds,
attention counted, by part), kept tokens and peak memory.

  python tools/benchmark_eva.py --config-file configs/ade20k/eva_algm.yaml --images photos/ --batch 2 \
      --device cuda --precision bf16 --out eva.json
  # the same code path on a tiny model, on the CPU
  python tools/benchmark_eva.py --config-file configs/demo/eva_tiny_algm.yaml --device cpu --size 128 --iters 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:  # torch and the model load in main, after the arguments, so that --help answers at once
    import torch

    from algm_d2.merge import ALGMConfig

logger = logging.getLogger("benchmark_eva")
PRECISION_NAMES = ("bf16", "fp16", "fp32")  # algm_d2.config.PRECISIONS
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def settings(cfg, depth: int, global_layer: int = 0) -> Dict[str, ALGMConfig]:  # noqa: ANN001 - a CfgNode
    """Baseline; the config's thresholds (MODEL.ALGM.*, whether ENABLED or not) under its batch policy and the
    other one; both stages scoring with τ above any cosine (nothing merges); fixed levels (fractions merged)."""
    from algm_d2.merge import OFF, ALGMConfig, FixedLevel

    node = cfg.MODEL.ALGM
    layers = {"local_layer": node.LOCAL_LAYER, "global_layer": global_layer or min(node.GLOBAL_LAYER, depth),
              "window": tuple(node.WINDOW)}
    thresholds = {"local_threshold": node.LOCAL_THRESHOLD, "global_threshold": node.GLOBAL_THRESHOLD}
    policies = [node.BATCH_POLICY] + [p for p in ("min", "per_image") if p != node.BATCH_POLICY]

    def level(local: float, global_: float) -> ALGMConfig:
        return ALGMConfig(**layers, local_threshold=FixedLevel(fraction=local),
                          global_threshold=FixedLevel(fraction=global_))
    return {"baseline": OFF,
            **{f"algm_{policy}": ALGMConfig(**layers, **thresholds, batch_policy=policy) for policy in policies},
            "scored_nothing_merged": ALGMConfig(**layers, local_threshold=2.0, global_threshold=2.0),
            "algm_25_30": level(0.25, 0.30), "algm_50_50": level(0.5, 0.5)}


def load_crops(folder: str, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Every image of ``folder`` resized (short side) and centre-cropped to ``size``², normalized: ``[N, 3, s, s]``."""
    import numpy as np
    import torch

    from algm_d2.data import read_image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"--images {folder}: no {sorted(IMAGE_SUFFIXES)} files")
    crops = []
    for path in paths:
        image = torch.from_numpy(np.ascontiguousarray(read_image(str(path)))).permute(2, 0, 1)[None].float()
        scale = size / min(image.shape[-2:])
        new = (max(size, round(image.shape[-2] * scale)), max(size, round(image.shape[-1] * scale)))
        image = torch.nn.functional.interpolate(image, size=new, mode="bilinear", align_corners=False)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        crops.append(image[..., top:top + size, left:left + size])
    return (torch.cat(crops) - mean.view(1, 3, 1, 1).cpu()) / std.view(1, 3, 1, 1).cpu()


def mixed_batches(crops: torch.Tensor, batch: int, count: int) -> List[torch.Tensor]:
    """``count`` batches of ``batch`` distinct crops (consecutive, cycling), so token counts vary from call to call."""
    order = [i % crops.shape[0] for i in range(count * batch)]
    return [crops[order[i * batch:(i + 1) * batch]] for i in range(count)]


class SectionTimer:
    """Per call of :meth:`call`, the section boundaries it marks: events on the current stream (CUDA) or wall-clock
    times (CPU)."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._event = torch.cuda.Event
        self.marks: List[tuple] = []
        self.calls: List[List[tuple]] = []

    def mark(self, label: str) -> None:
        if self.cuda:
            event = self._event(enable_timing=True)
            event.record()
            self.marks.append((label, event))
        else:
            self.marks.append((label, time.perf_counter()))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` between an "adapter" mark (what runs before the first blocks) and an "end" mark."""
        self.marks = []
        self.mark("adapter")
        out = fn(*args)
        self.mark("end")
        self.calls.append(self.marks)
        return out

    def durations(self, last: int) -> List[Dict[str, float]]:
        """Of each of the ``last`` calls: ms between each mark and the next, summed by the label of the section's
        start."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        runs = []
        for marks in self.calls[-last:]:
            out: Dict[str, float] = defaultdict(float)
            for (label, start), (_, end) in zip(marks, marks[1:]):
                out[label] += start.elapsed_time(end) if self.cuda else (end - start) * 1000.0
            runs.append(dict(out))
        return runs


@contextmanager
def sections(net: torch.nn.Module, timer: SectionTimer) -> Iterator[None]:
    """Mark: ViT blocks (each ``run_blocks`` call) vs the adapter around them; pixel decoder; transformer decoder
    (with the prediction heads and the semantic inference after it)."""
    vit, head = net.backbone.vit, net.decode_head
    run_blocks = vit.run_blocks

    def timed_blocks(*args: Any, **kwargs: Any) -> None:
        timer.mark("vit_blocks")
        run_blocks(*args, **kwargs)
        timer.mark("adapter")

    def label_hooks(module: torch.nn.Module, label: str, after: str) -> List[Any]:
        return [module.register_forward_pre_hook(lambda *_: timer.mark(label)),
                module.register_forward_hook(lambda *_: timer.mark(after))]

    vit.run_blocks = timed_blocks
    # the head runs the decoder layers itself after the pixel decoder: everything after it is the decoder
    hooks = label_hooks(head.pixel_decoder, "pixel_decoder", "transformer_decoder")
    try:
        yield
    finally:
        del vit.run_blocks
        for hook in hooks:
            hook.remove()


def time_forward(net: torch.nn.Module, batches: Sequence[torch.Tensor], warmup: int, iters: int,
                 autocast: Callable[[], Any]) -> Dict[str, Any]:
    """Synchronized wall clock per forward (the benchmarks' timing core), each call on the next of ``batches``
    (cycled when they are fewer than the calls), and the CUDA-event split by section."""
    import numpy as np
    import torch

    from algm_d2.evaluation import time_calls

    device = batches[0].device
    per_crop = batches[0].shape[0]
    timer = SectionTimer(device)
    with torch.no_grad(), autocast(), sections(net, timer):
        timed = time_calls(lambda batch: timer.call(net, batch), itertools.cycle(batches), warmup=warmup,
                           iters=iters, device=device, batch_size=per_crop)
    runs = timer.durations(iters)
    labels = sorted({k for r in runs for k in r})
    split = {k: float(np.median([r.get(k, 0.0) for r in runs])) / per_crop for k in labels}
    return {"ms_per_crop": timed.median_ms / per_crop, "ms_per_crop_by_part_gpu_events": split,
            "ms_per_forward": [round(t, 3) for t in timed.ms_per_call], "peak_memory_mb": timed.peak_memory_mb}


def gflops_by_part(net: torch.nn.Module, images: torch.Tensor) -> Dict[str, Any]:
    """fvcore multiply-adds per crop of ``images``, by part; deformable sampling (grid_sample) is not counted (its
    linears are)."""
    from algm_d2.evaluation import count_gflops
    from algm_d2.modeling.ops.msda import MSDeformAttn

    msda = [m for m in net.modules() if isinstance(m, MSDeformAttn)]
    impls = [m.impl for m in msda]
    for m in msda:  # the jit trace cannot enter the Triton kernel's autograd function
        m.impl = "reference"
    names = ("backbone", "backbone.blocks", "decode_head", "decode_head.pixel_decoder")
    try:
        counted = count_gflops(net, (images,), module_names=names)
    finally:
        for m, impl in zip(msda, impls):
            m.impl = impl
    part = {name: gflops / counted["num_images"] for name, gflops in counted["by_name"].items()}
    whole = counted["gflops_per_image"]
    parts = {"vit_blocks": part["backbone.blocks"], "adapter": part["backbone"] - part["backbone.blocks"],
             "pixel_decoder": part["decode_head.pixel_decoder"],
             "transformer_decoder_and_heads": part["decode_head"] - part["decode_head.pixel_decoder"],
             "other": whole - part["backbone"] - part["decode_head"]}
    return {"gflops_per_crop": whole, "gflops_by_part_per_crop": parts,
            "unsupported_ops": counted.get("unsupported_ops")}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/ade20k/eva.yaml")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=sorted(PRECISION_NAMES), default="bf16")
    parser.add_argument("--size", type=int, default=896, help="crop side (EVA: 896)")
    parser.add_argument("--batch", type=int, default=2, help="crops per forward (EVA's TEST.BATCH_SIZE: 2)")
    parser.add_argument("--images", default=None, help="folder of photos for the crops (default: noise)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--global-layer", type=int, default=None,
                        help="default: MODEL.ALGM.GLOBAL_LAYER (the last block if the model is shallower)")
    parser.add_argument("--settings", nargs="+", default=None, help="a subset of the settings (default: all)")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--out", default="benchmark_eva.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import numpy as np
    import torch

    from algm_d2.config import get_cfg, precision_dtype
    from algm_d2.evaluation.benchmark import random_crops
    from algm_d2.modeling import build_model

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
        model = build_model(cfg).eval()
    net = model.net
    dtype = precision_dtype(args.precision, "--precision")

    def autocast():  # noqa: ANN202
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    calls = args.warmup + args.iters
    if args.images:  # every call a batch of crops never seen before, as in an evaluation
        photos = load_crops(args.images, args.size, model.pixel_mean, model.pixel_std)
        crops = random_crops(photos, -(-calls * args.batch // photos.shape[0]), args.size)
    else:
        crops = torch.randn(calls * args.batch, 3, args.size, args.size)
    batches = [b.to(device) for b in mixed_batches(crops, args.batch, calls)]
    chosen = settings(cfg, net.backbone.depth, global_layer)
    if args.settings:
        unknown = set(args.settings) - set(chosen)
        if unknown:
            raise SystemExit(f"--settings: unknown {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {name: chosen[name] for name in args.settings}
    report: Dict[str, Any] = {"config_file": args.config_file, "precision": args.precision, "size": args.size,
                              "batch": args.batch, "images": args.images or "noise", "distinct_batches": len(batches),
                              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "results": {}}
    for name, algm in chosen.items():
        net.set_algm(algm)
        entry = time_forward(net, batches, args.warmup, args.iters, autocast)
        entry["algm"] = repr(algm)
        entry["tokens_per_layer"] = net.merge_stats["tokens_per_layer"]
        entry["final_tokens_mean"] = (float(np.mean(entry["tokens_per_layer"][-1])) if entry["tokens_per_layer"]
                                      else None)
        if not args.no_flops:
            with autocast():
                entry.update(gflops_by_part(net, batches[0]))
        report["results"][name] = entry
        logger.info("%s: %.2f ms/crop %s", name, entry["ms_per_crop"],
                    {k: round(v, 2) for k, v in entry["ms_per_crop_by_part_gpu_events"].items()})
    Path(args.out).write_text(json.dumps(report, indent=1))
    base = report["results"].get("baseline", next(iter(report["results"].values())))
    parts = list(base["ms_per_crop_by_part_gpu_events"])
    print("| setting | final tokens | ms/crop (synchronized) | × baseline speed | GFLOPs/crop | "
          + " | ".join(f"{k} ms (by section)" for k in parts) + " | peak MB |")
    print("|---" * (6 + len(parts)) + "|")
    for name, entry in report["results"].items():
        split = " | ".join(f"{entry['ms_per_crop_by_part_gpu_events'].get(k, 0.0):.2f}" for k in parts)
        print(f"| {name} | {entry['final_tokens_mean']:.0f} | {entry['ms_per_crop']:.2f} | "
              f"{base['ms_per_crop'] / entry['ms_per_crop']:.2f} | {entry.get('gflops_per_crop', float('nan')):.4g} | "
              f"{split} | {entry['peak_memory_mb'] or 0:.0f} |")


if __name__ == "__main__":
    main()
