#!/usr/bin/env bash
# Creates (or reuses) a venv for test tools from a requirements file, keyed by the file's hash:
#   tests/tools/ensure-venv.sh NAME REQUIREMENTS   → prints the venv's bin dir
# Cached in ${KERNELBOX_CACHE_DIR:-~/.cache/kernelbox}/NAME-<hash>; idempotent.
set -euo pipefail
name=$1 requirements=$2
cache=${KERNELBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kernelbox}
hash=$(sha256sum "$requirements" | cut -c1-12)
venv="$cache/$name-$hash"
if [ ! -x "$venv/bin/python" ] || [ ! -e "$venv/.complete" ]; then
    echo "[$name] creating $venv" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.complete"
fi
echo "$venv/bin"
