#!/usr/bin/env bash
# Writes the project's two locks, the one resolved set of versions that every install path takes:
#
#   deploy/requirements.lock       what the image runs: pyproject.toml's dependencies, the build tools
#                                  (pip and pyproject.toml's build-system requires), torch at TORCH_SPEC
#                                  from the package index (the CUDA build, with the CUDA libraries it pins)
#   deploy/requirements-test.lock  the same pins plus the `test` and `bench` extras: what `make install`
#                                  (and so CI) installs, as pip constraints (deploy/install.sh)
#
# Both are resolved for the image's platform (Linux x86_64, CPython 3.11: the Dockerfile's
# PYTHON_VERSION). A lock moves only when this script is run: uv keeps every pin of the existing file
# that still satisfies pyproject.toml, so a re-lock after adding a dependency adds it (and what it
# needs) and moves nothing else. To move versions on purpose:
#
#   make lock                                        after changing pyproject.toml or TORCH_SPEC
#   make lock LOCK_ARGS='--upgrade-package diffusers'  one package (and what it needs) to its newest
#   make lock LOCK_ARGS=--upgrade                    everything to the newest that the ranges allow
#
# then `make clean test` (a new venv from the new lock) before committing both files.
#
#   deploy/lock.sh TORCH_SPEC [UV_PIP_COMPILE_OPTION...]
#
# Needs uv 0.13 or newer on PATH (`pip install uv`; UV=path/to/uv for another) and the package index.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 TORCH_SPEC [UV_PIP_COMPILE_OPTION...]" >&2
    exit 2
fi
torch_spec=$1
shift
uv=${UV:-uv}
command -v "$uv" >/dev/null || { echo "deploy/lock.sh needs uv: pip install uv (or UV=/path/to/uv)" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "$torch_spec" >"$work/torch.txt"
# The build tools are locked too: the package is built with them (--no-build-isolation), not with
# whatever setuptools the index has that day.
{
    echo pip
    python3 -c 'import sys, tomllib; print(*tomllib.load(sys.stdin.buffer)["build-system"]["requires"], sep="\n")' \
        <pyproject.toml
} >"$work/build-tools.in"

compile() { # OUTPUT [OPTION...]
    local output=$1
    shift
    "$uv" pip compile pyproject.toml "$work/build-tools.in" \
        --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 \
        --no-annotate \
        --no-header \
        --output-file "$output" \
        "$@"
    # No annotations and no uv header (both would name this script's temporary input file): this
    # header says how the file was made.
    sed -i "1i # Written by deploy/lock.sh ('make lock'): do not edit; see that script to move a version." "$output"
}
# uv reads the existing file's pins as preferences; the header line is a comment, which it ignores.
compile deploy/requirements.lock --constraint "$work/torch.txt" "$@"
compile deploy/requirements-test.lock --extra test --extra bench \
    --constraint deploy/requirements.lock "$@"
