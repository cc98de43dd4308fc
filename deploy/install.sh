#!/usr/bin/env bash
# The one way this project is installed: `make install` (developers, CI) and deploy/Dockerfile
# both run this script.
#
#   deploy/install.sh PYTHON TORCH_SPEC [EXTRAS]   a development install (make install, CI)
#   deploy/install.sh --locked PYTHON TORCH_SPEC   the image's dependencies, before its code
#   deploy/install.sh --package PYTHON             the image's package, once its code is copied
#
# PYTHON: the interpreter to install into (a virtualenv's, or the image's own).
# TORCH_SPEC: the torch requirement. A development install puts it in first, so that pip keeps
#   that build (a CPU wheel here) when it resolves this package's `torch>=` range; --locked checks
#   that deploy/requirements.lock pins exactly it (the CUDA build from the package index).
# EXTRAS: optional dependency groups of pyproject.toml, e.g. "test"; empty for none.
# --locked installs deploy/requirements.lock and nothing else (deploy/lock.sh writes it), so the
# image's multi-GB dependency layer changes only with the lock; --package then adds this package
# without dependencies and checks that the lock satisfies it.
set -euo pipefail
usage="usage: $0 PYTHON TORCH_SPEC [EXTRAS] | --locked PYTHON TORCH_SPEC | --package PYTHON"
root=$(cd "$(dirname "$0")/.." && pwd)
lock=$root/deploy/requirements.lock

case ${1:-} in
--locked)
    [ $# -eq 3 ] || { echo "$usage" >&2; exit 2; }
    python=$2
    torch_spec=$3
    if ! grep -qxF "$torch_spec" "$lock"; then
        echo "deploy/requirements.lock pins $(grep -E '^torch==' "$lock" || echo 'no torch'), not" \
            "$torch_spec: run deploy/lock.sh PYTHON '$torch_spec'" >&2
        exit 1
    fi
    "$python" -m pip install -q --upgrade pip
    "$python" -m pip install -q --no-deps -r "$lock"
    ;;
--package)
    [ $# -eq 2 ] || { echo "$usage" >&2; exit 2; }
    python=$2
    "$python" -m pip install -q --no-deps "$root"
    "$python" -m pip check # the lock holds every dependency, at versions this package accepts
    ;;
*)
    [ $# -ge 2 ] && [ $# -le 3 ] || { echo "$usage" >&2; exit 2; }
    python=$1
    torch_spec=$2
    extras=${3:-}
    "$python" -m pip install -q --upgrade pip
    "$python" -m pip install -q "$torch_spec"
    "$python" -m pip install -q -e "$root${extras:+[$extras]}"
    ;;
esac
