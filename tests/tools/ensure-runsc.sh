#!/usr/bin/env bash
# Makes gVisor's runsc available to the Docker engine as the runtime `runsc-kernelbox`, so the
# `--runtime` test runs for real (tests/secure_defaults.rs). Idempotent: does nothing when the
# engine already lists the runtime. Registering it needs /etc/docker/daemon.json and a reload of
# the engine (SIGHUP: runtimes are reloaded, running containers are untouched). Never fails the
# run: where it cannot be set up, it says why loudly and the test reports itself SKIPPED.
set -uo pipefail
NAME=runsc-kernelbox
have() { docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q "\"$NAME\""; }
loud() { printf '\n!!! gVisor: %s; the --runtime test will be SKIPPED\n\n' "$*"; exit 0; }

have && { echo "gVisor runtime $NAME is registered"; exit 0; }
[ "$(id -u)" = 0 ] || loud "not root, cannot install runsc or edit /etc/docker/daemon.json"
if ! command -v runsc >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc) >/dev/null \
    || loud "apt-get install runsc failed"
fi
pid=$(pidof dockerd) || loud "no dockerd process to reload (the engine is not local)"
python3 - "$NAME" <<'PY' || loud "cannot update /etc/docker/daemon.json"
import json, os, sys
path = "/etc/docker/daemon.json"
config = json.load(open(path)) if os.path.exists(path) else {}
config.setdefault("runtimes", {})[sys.argv[1]] = {
    "path": "/usr/bin/runsc",
    # The kernel binds its ipc sockets in a host directory (gVisor: --host-uds=create), and its
    # container has network `none` (gVisor refuses to run in the host's network namespace).
    "runtimeArgs": ["--network=none", "--host-uds=create"],
}
os.makedirs(os.path.dirname(path), exist_ok=True)
tmp = path + ".kernelbox.tmp"
with open(tmp, "w") as f:
    json.dump(config, f)
os.replace(tmp, path)
PY
kill -HUP "$pid"
for _ in $(seq 20); do have && { echo "gVisor runtime $NAME registered"; exit 0; }; sleep 0.5; done
loud "the engine did not list $NAME after a reload"
