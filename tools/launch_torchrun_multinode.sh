#!/usr/bin/env bash
# Several machines with torchrun (env:// rendezvous). Run on every machine with its own NODE_RANK:
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 GPUS=8 tools/launch_torchrun_multinode.sh CONFIG [KEY VALUE ...]
set -euo pipefail
config=${1:?config file}; shift
exec torchrun --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "${GPUS:-8}" \
  --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" \
  train_net.py --config-file "$config" "$@"
