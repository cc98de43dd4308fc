#!/usr/bin/env bash
# One GPU check (issue 15; docs/gpu.md): the engine's cost on SD 1.5's architecture, the levers,
# half-precision numerics and the pipeline on one GPU, written to OUTDIR in under 9 minutes.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # on the GPU machine: python3 is the one with torch
#   bash benchmarks/gpu_check.sh OUTDIR --tiny     # the same parts on the CPU at tiny sizes
#
# PYTHON picks the interpreter (default python3); every other argument goes to benchmarks.gpu_check.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--tiny] [--budget S] [--parts PART ...]" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
# The repository on the path: benchmarks/ and pipeline/ run from the tree, not an installed package.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
# The GPU machine reaches no network: nothing may wait on one (the hub, Ray's usage report).
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
"${PYTHON:-python3}" -m benchmarks.gpu_check --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
