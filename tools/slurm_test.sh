#!/usr/bin/env bash
# Evaluation on a SLURM cluster, one task per GPU (see slurm_launch.sh):
#   bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py options]" >&2
    exit 2
fi
HERE="$(dirname "$0")"
exec bash "$HERE/slurm_launch.sh" "$1" "$2" "$HERE/test.py" "$3" "$4" \
    --launcher slurm "${@:5}"
