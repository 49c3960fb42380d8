#!/usr/bin/env python
"""Train or evaluate an ALGM segmentation model, detectron2-style.

  python train_net.py --config-file configs/demo/segmenter_tiny_algm.yaml
  python train_net.py --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml \
      --num-gpus 8 MODEL.WEIGHTS seg_small_mask/checkpoint.pth
  python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS output/model_final.pth
Also runs under torchrun, the deepspeed launcher and srun (see docs/LAUNCH.md).
"""
import logging
from pathlib import Path

from algm_d2.checkpoint import load_model_weights
from algm_d2.engine import Trainer, default_argument_parser, evaluate, launch, setup
from algm_d2.modeling import build_model

logger = logging.getLogger("train_net")


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = build_model(cfg)
        weights = cfg.MODEL.WEIGHTS or str(Path(cfg.OUTPUT_DIR) / "model_final.pth")
        load_model_weights(model, weights)
        return evaluate(cfg, model)
    return Trainer(cfg, resume=args.resume).train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
