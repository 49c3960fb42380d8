#!/usr/bin/env bash
# One machine, N GPUs: train_net.py spawns one process per GPU (NCCL).
#   tools/launch_multi_gpu.sh 8 configs/ade20k/segmenter/segmenter_vit_small_mask_512x512_160k_algm.yaml [KEY VALUE ...]
set -euo pipefail
gpus=${1:?number of GPUs}; config=${2:?config file}; shift 2
exec python train_net.py --num-gpus "$gpus" --config-file "$config" "$@"
