#!/usr/bin/env bash
# The srun call behind slurm_train.sh and slurm_test.sh (one task per GPU,
# mmengine's `--launcher slurm` reads the rank and world size from SLURM):
#   bash tools/slurm_launch.sh PARTITION JOB_NAME SCRIPT [script arguments]
# GPUS (total, default 8), GPUS_PER_NODE (default 8), CPUS_PER_TASK
# (default 5), PORT (default 29500), SRUN_ARGS (extra srun options) and
# PYTHON (default: python) adjust it. Multi-node jobs: set GPUS above
# GPUS_PER_NODE, e.g. GPUS=16 for two 8-GPU nodes.
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
SCRIPT=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "$GPUS" -lt "$GPUS_PER_NODE" ]; then
    GPUS_PER_NODE=$GPUS
fi
# mmengine's slurm launcher takes the master port from MASTER_PORT
export MASTER_PORT=${PORT:-29500}
PYTHONPATH="$(dirname "$0")/..":${PYTHONPATH:-} \
exec srun --partition="$PARTITION" --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 \
    ${SRUN_ARGS:-} "${PYTHON:-python}" -u "$SCRIPT" "${@:4}"
