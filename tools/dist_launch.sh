#!/usr/bin/env bash
# The torchrun call behind dist_train.sh and dist_test.sh:
#   bash tools/dist_launch.sh NUM_PROCS SCRIPT [script arguments]
# NNODES, NODE_RANK, PORT, MASTER_ADDR: multi-node settings; PYTHON picks
# the interpreter (default: python).
set -euo pipefail
NPROCS=$1
SCRIPT=$2
PYTHONPATH="$(dirname "$0")/..":${PYTHONPATH:-} \
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$NPROCS" \
    --master_port="${PORT:-29500}" \
    "$SCRIPT" "${@:3}"
