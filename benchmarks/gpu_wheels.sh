#!/usr/bin/env bash
# The wheels the GPU machine lacks (diffusers, Ray and what they need), at this environment's exact
# versions, for Python 3.12 manylinux x86_64, into .whl/ (git ignores it). See docs/gpu.md.
#
#   bash benchmarks/gpu_wheels.sh            # all: every part of benchmarks/gpu_check.sh
#   bash benchmarks/gpu_wheels.sh --no-ray   # diffusers only: the check's pipeline part skips itself
#
# PYTHON picks the interpreter whose installed versions are copied (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m benchmarks.gpu_wheels "$@"
