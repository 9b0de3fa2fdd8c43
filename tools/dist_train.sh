#!/usr/bin/env bash
# Multi-process training with torchrun (one process per GPU; on a machine
# without CUDA the processes run on the CPU with the gloo backend).
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py options]
# Multi-node settings and PYTHON: see dist_launch.sh.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_PROCS [tools/train.py options]" >&2
    exit 2
fi
HERE="$(dirname "$0")"
exec bash "$HERE/dist_launch.sh" "$2" "$HERE/train.py" "$1" \
    --launcher pytorch "${@:3}"
