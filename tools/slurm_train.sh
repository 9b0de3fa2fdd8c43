#!/usr/bin/env bash
# Training on a SLURM cluster, one task per GPU (see slurm_launch.sh for
# GPUS, GPUS_PER_NODE, CPUS_PER_TASK, PORT, SRUN_ARGS):
#   bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG [train.py options]
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG [tools/train.py options]" >&2
    exit 2
fi
HERE="$(dirname "$0")"
exec bash "$HERE/slurm_launch.sh" "$1" "$2" "$HERE/train.py" "$3" \
    --launcher slurm "${@:4}"
