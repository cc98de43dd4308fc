#!/usr/bin/env bash
# Writes deploy/requirements.lock: every package the image runs, pinned (deploy/Dockerfile installs
# exactly these, with `deploy/install.sh --locked`). It resolves pyproject.toml's dependencies for
# the image's platform (Linux x86_64, CPython 3.11: the Dockerfile's PYTHON_VERSION), holding each
# package at the version PYTHON's environment has (the versions the tests ran on) and torch at
# TORCH_SPEC from the package index: the CUDA build, with the CUDA libraries that torch pins.
#
#   deploy/lock.sh PYTHON TORCH_SPEC        e.g. deploy/lock.sh .venv/bin/python torch==2.13.0
#
# Needs uv (`pip install uv`; UV=path/to/uv to use another) and the package index. Run it after
# changing pyproject.toml's dependencies, the Makefile's TORCH_SPEC or the venv's versions.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 PYTHON TORCH_SPEC" >&2
    exit 2
fi
python=$1
torch_spec=$2
root=$(cd "$(dirname "$0")/.." && pwd)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT

# The venv's torch is a local CPU build (+cpu): the image's is TORCH_SPEC instead.
"$python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|pti-pipeline)(==| @)' >"$constraints"
echo "$torch_spec" >>"$constraints"
cd "$root"
"${UV:-uv}" pip compile pyproject.toml \
    --constraint "$constraints" \
    --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 \
    --no-annotate \
    --custom-compile-command "deploy/lock.sh PYTHON '$torch_spec'" \
    --output-file deploy/requirements.lock
