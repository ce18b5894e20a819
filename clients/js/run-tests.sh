#!/usr/bin/env bash
# Runs the JavaScript client's tests against a real kernelbox server that each test file starts
# itself (local backend). Needs node ≥ 20 and the kernelbox binary: $KERNELBOX_BIN, or
# target/debug/kernelbox (run `cargo build` first; this script builds nothing). The local
# backend's Python venv is created on first use, or beforehand by `kernelbox setup`.
set -euo pipefail
cd "$(dirname "$0")/../.."

export KERNELBOX_BIN=${KERNELBOX_BIN:-$PWD/target/debug/kernelbox}
if [ ! -x "$KERNELBOX_BIN" ]; then
    echo "no kernelbox binary at $KERNELBOX_BIN: run cargo build or set KERNELBOX_BIN" >&2
    exit 1
fi

# Node 22+ has a global WebSocket; Node 20 and 21 need a flag for it.
flags=()
if ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)'; then
    flags+=(--experimental-websocket)
fi
exec node "${flags[@]}" --test clients/js/test/
