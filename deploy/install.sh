#!/usr/bin/env bash
# The one way this project is installed: `make install` (developers, CI) and deploy/Dockerfile
# both run this script, and both take the versions of the locks that deploy/lock.sh writes, so a
# fresh clone installs what the tests ran on, whatever the package index holds that day.
#
#   deploy/install.sh PYTHON TORCH_SPEC [EXTRAS]   a development install (make install, CI)
#   deploy/install.sh --locked PYTHON TORCH_SPEC   the image's dependencies, before its code
#   deploy/install.sh --package PYTHON             the image's package, once its code is copied
#
# PYTHON: the interpreter to install into (a virtualenv's, or the image's own).
# TORCH_SPEC: the torch requirement; the locks must pin exactly it (run `make lock` to move it).
#   A development install puts it in first, so that pip keeps that build (a CPU wheel here) when it
#   resolves this package's `torch>=` range; the image takes the lock's (the CUDA build).
# EXTRAS: optional dependency groups of pyproject.toml, e.g. "test"; empty for none.
# A development install takes deploy/requirements-test.lock as pip constraints: every package it
# installs, the extras' too, at the locked version. --locked installs deploy/requirements.lock and
# nothing else, so the image's multi-GB dependency layer changes only with the lock; --package then
# adds this package without dependencies and checks that the lock satisfies it. The package is built
# with the locked setuptools (--no-build-isolation), not the index's newest.
set -euo pipefail
usage="usage: $0 PYTHON TORCH_SPEC [EXTRAS] | --locked PYTHON TORCH_SPEC | --package PYTHON"
root=$(cd "$(dirname "$0")/.." && pwd)
lock=$root/deploy/requirements.lock
test_lock=$root/deploy/requirements-test.lock

pins_torch() { # LOCK TORCH_SPEC
    grep -qxF "$2" "$1" && return
    echo "${1#"$root"/} pins $(grep -E '^torch==' "$1" || echo 'no torch'), not $2:" \
        "run 'make lock TORCH_SPEC=\"$2\"' (deploy/lock.sh)" >&2
    exit 1
}

case ${1:-} in
--locked)
    [ $# -eq 3 ] || { echo "$usage" >&2; exit 2; }
    python=$2
    pins_torch "$lock" "$3"
    "$python" -m pip install -q --no-deps -r "$lock"
    ;;
--package)
    [ $# -eq 2 ] || { echo "$usage" >&2; exit 2; }
    python=$2
    "$python" -m pip install -q --no-deps --no-build-isolation "$root"
    "$python" -m pip check # the lock holds every dependency, at versions this package accepts
    ;;
*)
    [ $# -ge 2 ] && [ $# -le 3 ] || { echo "$usage" >&2; exit 2; }
    python=$1
    torch_spec=$2
    extras=${3:-}
    pins_torch "$test_lock" "$torch_spec"
    "$python" -m pip install -q -c "$test_lock" pip
    "$python" -m pip install -q -c "$test_lock" "$torch_spec" setuptools
    "$python" -m pip install -q -c "$test_lock" --no-build-isolation -e "$root${extras:+[$extras]}"
    "$python" -m pip check
    ;;
esac
