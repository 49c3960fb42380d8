#!/usr/bin/env bash
# The deepspeed launcher over a hostfile (passwordless ssh between machines); it sets RANK/LOCAL_RANK/WORLD_SIZE.
#   tools/launch_deepspeed.sh tools/hostfile.example CONFIG [KEY VALUE ...]
set -euo pipefail
hostfile=${1:?hostfile}; config=${2:?config file}; shift 2
exec deepspeed --hostfile "$hostfile" train_net.py --config-file "$config" "$@"
