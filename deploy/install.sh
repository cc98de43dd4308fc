#!/usr/bin/env bash
# The one way this project is installed: `make install` (developers, CI) and deploy/Dockerfile
# both run this script, so the image holds what the tests ran against.
#
#   deploy/install.sh PYTHON TORCH_SPEC [EXTRAS]
#
# PYTHON: the interpreter to install into (a virtualenv's, or the image's own).
# TORCH_SPEC: the torch requirement, installed first so that pip keeps that build (a CPU wheel
#   here, a CUDA one from PyPI in the image) when it resolves this package's `torch>=` range.
# EXTRAS: optional dependency groups of pyproject.toml, e.g. "test"; empty for none.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 PYTHON TORCH_SPEC [EXTRAS]" >&2
    exit 2
fi
python=$1
torch_spec=$2
extras=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)

"$python" -m pip install -q --upgrade pip
"$python" -m pip install -q "$torch_spec"
"$python" -m pip install -q -e "$root${extras:+[$extras]}"
