#!/usr/bin/env python
"""Train or evaluate an ALGM segmentation model, detectron2-style.

  python train_net.py --config-file configs/demo/segmenter_tiny_algm.yaml
  python train_net.py --num-gpus 8 \
      --config-file configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml
  python train_net.py --eval-only --config-file X.yaml MODEL.WEIGHTS output/model_final.pth
It also runs under torchrun, the deepspeed launcher and srun (docs/LAUNCH.md).
"""
from algm_d2.cli import default_argument_parser, run_with_short_errors


def main(args):
    # imported here, after the command line is parsed, so that --help does not wait for torch and DeepSpeed
    from algm_d2.checkpoint import load_model_weights
    from algm_d2.engine import Trainer, eval_only_config, evaluate, setup
    from algm_d2.modeling import build_model

    cfg = setup(args)
    if args.eval_only:
        cfg, weights = eval_only_config(cfg)
        model = build_model(cfg)
        load_model_weights(model, weights)
        return evaluate(cfg, model)
    return Trainer(cfg, resume=args.resume).train()


def launch_main(args, main_func=main):
    """Start the run's processes; each calls ``main_func(args)`` (a script of your own can pass a main that registers
    its datasets and then calls this module's ``main``: datasets/README.md)."""
    from algm_d2.engine import launch, launch_options, load_config

    launch(run_with_short_errors, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(main_func, args), **launch_options(load_config(args)))


if __name__ == "__main__":
    run_with_short_errors(launch_main, default_argument_parser().parse_args())
