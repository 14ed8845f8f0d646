#!/usr/bin/env bash
# The GPU queue in one device call: tools/gpu_queue.py runs the pending checks listed in
# tools/gpu_queue.toml after one build, under a total budget (GENEXT_QUEUE_BUDGET, default 540 s),
# and writes queue.log, results.json and table.md to $GENEXT_OUT (else $OUT, else
# ./gpu-queue-out). A second call on the still-warm machine resumes after the last finished check.
#
#   bash tools/gpu_queue.sh                                # the whole list
#   GENEXT_QUEUE_ONLY=models,model-benches bash tools/gpu_queue.sh
#   python3 tools/gpu_queue.py --dry-run                   # what it would run
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 tools/gpu_queue.py "$@"
