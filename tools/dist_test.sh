#!/usr/bin/env bash
# Multi-process testing with torchrun.
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py options]
# Multi-node settings and PYTHON: see dist_launch.sh.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_PROCS [tools/test.py options]" >&2
    exit 2
fi
HERE="$(dirname "$0")"
exec bash "$HERE/dist_launch.sh" "$3" "$HERE/test.py" "$1" "$2" \
    --launcher pytorch "${@:4}"
