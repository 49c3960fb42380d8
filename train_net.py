#!/usr/bin/env python
"""Train or evaluate an ALGM segmentation model, detectron2-style.

  python train_net.py --config-file configs/demo/segmenter_tiny_algm.yaml
  python train_net.py --num-gpus 8 \
      --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml
  python train_net.py --eval-only --config-file X.yaml MODEL.WEIGHTS output/model_final.pth
It also runs under torchrun, the deepspeed launcher and srun (docs/LAUNCH.md).
"""
from algm_d2.checkpoint import load_model_weights
from algm_d2.engine import (
    Trainer, default_argument_parser, eval_weights, evaluate, launch, launch_options, load_config, setup,
)
from algm_d2.modeling import build_model


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = build_model(cfg)
        load_model_weights(model, eval_weights(cfg))
        return evaluate(cfg, model)
    return Trainer(cfg, resume=args.resume).train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,), **launch_options(load_config(args)))
