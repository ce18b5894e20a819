#!/usr/bin/env bash
# The notebook in a real browser: headless Chromium (Debian's package) driven by Playwright,
# against a real kernelbox server. Idempotent; builds nothing:
#   - installs chromium with apt when it is missing (apt-get update only when apt needs it);
#   - makes or reuses the test venv (tests/tools/ensure-venv.sh, cached by requirements hash);
#   - starts $KERNELBOX_BIN (default target/debug/kernelbox: run `cargo build` first) with the
#     local backend, or the Docker one with KERNELBOX_BROWSER_BACKEND=docker (needs the image);
#   - runs pytest (extra arguments are passed on), stops the server.
# The screenshot is kept at target/artifacts/notebook.png.
set -euo pipefail
cd "$(dirname "$0")/../.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi

chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
    echo "[browser] installing chromium (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y chromium >/dev/null; then
        $sudo apt-get update >/dev/null
        $sudo apt-get install -y chromium >/dev/null
    fi
fi

venv_bin=$(tests/tools/ensure-venv.sh browser tests/browser/requirements.txt)

bin=${KERNELBOX_BIN:-target/debug/kernelbox}
if [ ! -x "$bin" ]; then
    echo "no kernelbox binary at $bin: run cargo build or set KERNELBOX_BIN" >&2
    exit 1
fi
backend=${KERNELBOX_BROWSER_BACKEND:-local}

mkdir -p target/artifacts
log=target/artifacts/browser-server.log
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

# --ephemeral: stopping the server removes every session (the Docker backend would otherwise keep
# them for its next start).
"$bin" serve --backend "$backend" --ephemeral --token "$token" --bind "127.0.0.1:$port" --pool-size 0 >"$log" 2>&1 &
server=$!
stop_server() {
    if kill -0 "$server" 2>/dev/null; then
        kill -TERM "$server"
        wait "$server" 2>/dev/null || true
    fi
}
trap stop_server EXIT

for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then
        echo "kernelbox exited:" >&2; cat "$log" >&2; exit 1
    fi
    sleep 0.2
done
curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || { echo "kernelbox did not start:" >&2; cat "$log" >&2; exit 1; }
echo "[browser] kernelbox ($backend backend) on 127.0.0.1:$port" >&2

status=0
KERNELBOX_URL="http://127.0.0.1:$port" KERNELBOX_TOKEN="$token" CHROMIUM="$chromium" \
    "$venv_bin/python" -m pytest -p no:cacheprovider tests/browser "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- server log (last 40 lines) ---" >&2; tail -n 40 "$log" >&2
fi
exit "$status"
