#!/usr/bin/env python
"""Benchmark Segmenter with and without ALGM: images/s (repeat and mixed protocols, each call timed from before it to
the synchronize after it, as the release times), latency, memory, GFLOPs, tokens.

Examples:
  # random-weight Seg-S at 512², batch 32, bf16, on the GPU (the paper's setting), on your photos
  python tools/benchmark.py --variant small --images photos/ --num-images 8 --device cuda --precision bf16 \
      --output-dir output/bench
  # a released checkpoint on your own images
  python tools/benchmark.py --checkpoint seg_small_mask/checkpoint.pth --images my_images/ --device cuda
  # a quick CPU run anyone can reproduce
  python tools/benchmark.py --variant tiny --image-size 256 --batch-size 4 --precision fp32 --warmup 2 --iters 5
  # any network a config builds (SETR, SegViT, ...), random weights unless MODEL.WEIGHTS is given after the flags
  python tools/benchmark.py --config-file configs/ade20k/setr/setr_naive_vit_large_512x512_160k.yaml --device cuda
Writes benchmark.json and benchmark.md into --output-dir.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:  # torch and the model load in main, after the arguments, so that --help answers at once
    import torch

logger = logging.getLogger("benchmark")
# the library's names (algm_d2.evaluation.benchmark, algm_d2.modeling), written here so that --help needs no torch
VARIANTS = ("base", "large", "small", "tiny")  # SEGMENTER_VARIANTS
PRECISION_NAMES = ("bf16", "fp16", "fp32")  # algm_d2.config.PRECISIONS
PROTOCOLS = ("repeat", "mixed")
OUTPUTS = ("logits", "labels")


def parse_args(argv=None) -> argparse.Namespace:  # noqa: ANN001
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--variant", choices=VARIANTS, default="small",
                       help="random-weight Segmenter (ADE20K, 150 classes, mask transformer)")
    model.add_argument("--checkpoint", help="a release checkpoint.pth (variant.yml beside it)")
    model.add_argument("--config-file", help="a config: the network it builds (random weights unless MODEL.WEIGHTS "
                                             "is among the trailing KEY VALUE overrides); crop TEST.CROP_SIZE")
    parser.add_argument("--image-size", type=int, default=None, help="crop size (default 512; 640 for large)")
    parser.add_argument("--images", default="demo",
                        help="folder of images, or 'demo' for the procedural demo dataset (default)")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=PRECISION_NAMES, default="bf16")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--settings", nargs="+", default=None,
                        help="subset of: baseline algm algm_per_image paper_level level0 level0_scored (default all)")
    parser.add_argument("--threshold", type=float, default=0.88, help="CLAP τ of the algm settings")
    parser.add_argument("--global-layer", type=int, default=None, help="GBM layer (default 5; 7 for large)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5,
                        help="the timed iterations visit every setting in this many interleaved rounds")
    parser.add_argument("--flops-images", type=int, default=2, help="images whose GFLOPs are counted (0: skip)")
    parser.add_argument("--output", choices=OUTPUTS, default="logits",
                        help="time full-resolution logits (default) or the evaluation's argmax labels (fused)")
    parser.add_argument("--mfu", action="store_true",
                        help="also measure the plain encoder's TFLOP/s against the measured matmul ceiling")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile mode for static-shape settings (default, max-autotune, reduce-overhead)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay static-shape settings as CUDA graphs (thresholds stay eager)")
    parser.add_argument("--no-block-graphs", action="store_true",
                        help="turn off the encoder's CUDA graphs of the segments between merges (on by default, "
                             "as in the model)")
    parser.add_argument("--graph-buckets", type=int, default=16,
                        help="row buckets per doubling of a per-image batch's packed total (the model's default)")
    parser.add_argument("--fresh-mixed", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed protocol on batches of distinct random crops (scale, offset, flip) of the "
                             "images, each used once, as an evaluation sees them (default); --no-fresh-mixed "
                             "cycles through the images themselves")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output-dir", default="output/benchmark")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="with --config-file: config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def net_from_config(path: str, opts: list) -> tuple:
    """(network, crop size, normalization on [0, 1] RGB, GBM layer of the config or None) of a config file."""
    import torch

    from algm_d2.checkpoint import load_model_weights
    from algm_d2.config import get_cfg
    from algm_d2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_model_weights(model, cfg.MODEL.WEIGHTS)
    normalization = {"mean": tuple(v / 255 for v in cfg.MODEL.PIXEL_MEAN),
                     "std": tuple(v / 255 for v in cfg.MODEL.PIXEL_STD)}
    global_layer = cfg.MODEL.ALGM.GLOBAL_LAYER if cfg.MODEL.ALGM.ENABLED else None
    return model.net.eval(), cfg.TEST.CROP_SIZE, normalization, global_layer


def load_images(source: str, count: int, size: int) -> torch.Tensor:
    """``count`` RGB images as float [0, 1] tensors resized (short side) and center-cropped to ``size``²."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from algm_d2.data import get_dataset_dicts, read_image

    if source == "demo":
        paths = [r["file_name"] for r in get_dataset_dicts("demo_shapes_val")[:count]]
    else:
        folder = Path(source)
        paths = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp"})
        if not paths:
            raise FileNotFoundError(f"--images {folder}: no .jpg/.jpeg/.png/.bmp files")
        paths = paths[:count]
    images = []
    for path in paths:
        image = torch.from_numpy(np.ascontiguousarray(read_image(path))).permute(2, 0, 1)[None].float() / 255
        scale = size / min(image.shape[-2:])
        new = (max(size, round(image.shape[-2] * scale)), max(size, round(image.shape[-1] * scale)))
        image = F.interpolate(image, size=new, mode="bilinear", align_corners=False)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        images.append(image[..., top:top + size, left:left + size])
    return torch.cat(images)


def main(argv=None) -> None:  # noqa: ANN001
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    import torch

    from algm_d2.checkpoint import NORMALIZATION, build_from_variant, load_model
    from algm_d2.evaluation import save_json
    from algm_d2.evaluation.benchmark import (
        benchmark_net, benchmark_table, encoder_utilisation, fresh_mixed_batches, random_crops, standard_settings,
    )
    from algm_d2.modeling import SEGMENTER_VARIANTS

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config_global_layer = None
    if args.config_file:
        net, crop, normalization, config_global_layer = net_from_config(args.config_file, args.opts)
        size = args.image_size or crop
        depth = net.backbone.depth
    elif args.checkpoint:
        net = load_model(args.checkpoint)
        size = args.image_size or net.backbone.pretrain_grid[0] * net.patch_size
        normalization = net.normalization or NORMALIZATION["vit"]
        depth = net.backbone.depth
    else:
        sizes = SEGMENTER_VARIANTS[args.variant]
        size = args.image_size or (640 if args.variant == "large" else 512)
        variant = {"net_kwargs": {"image_size": size, "patch_size": 16, "d_model": sizes["embed_dim"],
                                  "n_heads": sizes["num_heads"], "n_layers": sizes["depth"], "n_cls": 150,
                                  "decoder": {"name": "mask_transformer", "n_layers": 2}}}
        torch.manual_seed(0)
        net = build_from_variant(variant).eval()
        normalization = NORMALIZATION["vit"]
        depth = sizes["depth"]
    global_layer = args.global_layer or config_global_layer or (7 if depth == 24 else 5)
    settings = standard_settings(global_layer=global_layer, threshold=args.threshold)
    if args.settings:
        missing = set(args.settings) - set(settings)
        if missing:
            raise SystemExit(f"--settings: unknown {sorted(missing)}; choose from {sorted(settings)}")
        settings = {name: settings[name] for name in args.settings}
    images = load_images(args.images, args.num_images, size)
    mean = torch.tensor(normalization["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(normalization["std"]).view(1, 3, 1, 1)
    mixed = None
    if args.fresh_mixed and "mixed" in args.protocols:
        crops = fresh_mixed_batches(args.warmup, args.iters, args.rounds) * args.batch_size
        mixed = ((random_crops(images, -(-crops // len(images)), size) - mean) / std).to(device)
    images = ((images - mean) / std).to(device)
    net = net.to(device)
    report = benchmark_net(net, images, settings=settings, batch_size=args.batch_size, precision=args.precision,
                           protocols=args.protocols, warmup=args.warmup, iters=args.iters,
                           flops_images=args.flops_images, progress=sys.stderr.isatty(), output=args.output,
                           compile_mode=args.compile, rounds=args.rounds, cuda_graphs=args.cuda_graphs,
                           block_graphs=not args.no_block_graphs and device.type == "cuda",
                           graph_buckets=args.graph_buckets, mixed_images=mixed)
    if args.mfu:
        report["encoder_utilisation"] = encoder_utilisation(net.backbone, images[:1].expand(args.batch_size, -1, -1, -1),
                                                            precision=args.precision)
        logger.info("encoder utilisation: %s", report["encoder_utilisation"])
    model_name = args.config_file or args.checkpoint or f"segmenter_{args.variant} (random weights)"
    report["config"].update({"model": model_name,
                             "images": args.images, "command": " ".join(sys.argv)})
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "benchmark.json", report)
    table = benchmark_table(report, global_layer=global_layer)
    (out / "benchmark.md").write_text(table + "\n")
    print(table)  # the CLI's result


if __name__ == "__main__":
    main()
