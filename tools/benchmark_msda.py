#!/usr/bin/env python
"""Multi-scale deformable attention at the EVA model's shapes: the Triton kernels against the PyTorch reference
(max error of the output and of the three gradients in float32) and their speed (CUDA events, median).

  python tools/benchmark_msda.py --out msda.json        # on a GPU
  python tools/benchmark_msda.py --device cpu --tiny     # the reference alone, small shapes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:  # torch loads in main, after the arguments, so that --help answers at once
    import torch

# (name, value level shapes, heads, head dim, queries, points) per crop of 896² (ViT grid 56²).
EVA_SHAPES = [
    ("pixel decoder layer", [(28, 28), (56, 56), (112, 112)], 32, 32, 28 * 28 + 56 * 56 + 112 * 112, 4),
    ("adapter injector", [(112, 112), (56, 56), (28, 28)], 16, 44, 56 * 56, 4),
    ("adapter extractor", [(56, 56)], 16, 44, 112 * 112 + 56 * 56 + 28 * 28, 4),
]
TINY_SHAPES = [("tiny", [(8, 8), (4, 4)], 2, 6, 40, 2)]


def inputs(shapes, heads: int, dim: int, queries: int, points: int, batch: int, device: torch.device):  # noqa: ANN001
    import torch

    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, heads, dim, device=device, requires_grad=True)
    locations = (torch.rand(batch, queries, heads, len(shapes), points, 2, device=device) * 1.2 - 0.1)
    weights = torch.rand(batch, queries, heads, len(shapes), points, device=device).softmax(-1)
    return value, locations.requires_grad_(), weights.requires_grad_()


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, grad: bool) -> float:
    from algm_d2.evaluation import measure_throughput

    return measure_throughput(lambda _: fn(), None, warmup=warmup, iters=iters, device=device, batch_size=1,
                              grad=grad)["ms_per_batch_median"]


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--out", default="benchmark_msda.json")
    args = parser.parse_args(argv)
    import torch

    from algm_d2.modeling.ops.msda import ms_deform_attn_reference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_triton = device.type == "cuda"
    if use_triton:
        from algm_d2.modeling.ops.msda_triton import ms_deform_attn_triton
    rows: Dict[str, Any] = {}
    for name, shapes, heads, dim, queries, points in (TINY_SHAPES if args.tiny else EVA_SHAPES):
        torch.manual_seed(0)
        value, locations, weights = inputs(shapes, heads, dim, queries, points, args.batch, device)
        grad = torch.randn(args.batch, queries, heads * dim, device=device)
        ops = {"reference": lambda v, l, w: ms_deform_attn_reference(v, shapes, l, w)}
        if use_triton:
            ops["triton"] = lambda v, l, w: ms_deform_attn_triton(v, shapes, l, w)
        row: Dict[str, Any] = {}
        results = {}
        for op_name, op in ops.items():
            out = op(value, locations, weights)
            results[op_name] = (out, torch.autograd.grad(out, (value, locations, weights), grad))
            row[f"{op_name}_forward_ms"] = median_ms(lambda: op(value, locations, weights), device, args.warmup,
                                                     args.iters, grad=False)
            row[f"{op_name}_forward_backward_ms"] = median_ms(
                lambda: torch.autograd.grad(op(value, locations, weights), (value, locations, weights), grad),
                device, args.warmup, args.iters, grad=True)
        if use_triton:
            (ref, ref_grads), (tri, tri_grads) = results["reference"], results["triton"]
            row["max_abs_error"] = {"output": float((tri - ref).abs().max())}
            for key, a, b in zip(("grad_value", "grad_locations", "grad_weights"), tri_grads, ref_grads):
                row["max_abs_error"][key] = float((a - b).abs().max())
                row["max_abs_error"][key + "_relative"] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
            row["forward_speedup"] = row["reference_forward_ms"] / row["triton_forward_ms"]
            row["forward_backward_speedup"] = row["reference_forward_backward_ms"] / row["triton_forward_backward_ms"]
        rows[name] = row
    report = {"device": torch.cuda.get_device_name() if use_triton else "cpu", "batch": args.batch,
              "command": " ".join(sys.argv), "shapes": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| shape | reference fwd ms | triton fwd ms | fwd speed-up | reference fwd+bwd ms | triton fwd+bwd ms | "
          "fwd+bwd speed-up | max abs err (out) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['reference_forward_ms']:.3f} | {row.get('triton_forward_ms', float('nan')):.3f} | "
              f"{row.get('forward_speedup', float('nan')):.1f} | {row['reference_forward_backward_ms']:.3f} | "
              f"{row.get('triton_forward_backward_ms', float('nan')):.3f} | "
              f"{row.get('forward_backward_speedup', float('nan')):.1f} | "
              f"{row.get('max_abs_error', {}).get('output', float('nan')):.2e} |")


if __name__ == "__main__":
    main()
