#!/usr/bin/env python
"""Train or evaluate algm_d2 models with detectron2 + Mask2Former (Mask2Former's train_net with algm_d2's config).

  python tools/d2_train_net.py --config-file configs/detectron2/ade20k/algm_eva01_vit_adapter_mask2former_896_algm.yaml
  python tools/d2_train_net.py --num-gpus 8 --config-file X.yaml
  python tools/d2_train_net.py --eval-only --config-file X.yaml MODEL.WEIGHTS output/model_final.pth
Needs detectron2 and Mask2Former on PYTHONPATH (docs/DETECTRON2.md).
"""
from detectron2.engine import default_argument_parser, launch

from algm_d2.d2.train_net import main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
