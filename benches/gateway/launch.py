"""Jupyter Kernel Gateway (KG 3.x) as the benchmarks' reference, stock or tuned.

    python launch.py --port P --mode stock|tuned --kernel-python PY [--token T]
                     [--transport ipc|tcp] [--state-dir DIR]

Run it with the python of the venv made from requirements.txt next to this file
(`tests/tools/ensure-venv.sh gateway benches/gateway/requirements.txt` prints its bin dir). KG
runs in this very process (so this PID is KG's, for RSS) on 127.0.0.1:P with an auth token
(`Authorization: token T` or `?token=T`). Its only kernelspec, `python3`, runs PY exactly the
way kernelbox's local backend does (src/sandbox/local/mod.rs): `PY -m ipykernel_launcher -f
{connection_file} --HistoryManager.hist_file=:memory:`, the same environment additions, ipc
sockets (`--transport tcp` for KG's default), and a working directory outside the repository
(shared by all of KG's kernels, where kernelbox gives each session its own).

  stock  KG as shipped: Nagle's algorithm on its sockets and the IOPub rate limit (1000 msg/s,
         1 MB/s over 3 s), which drops the output of a fast-printing cell.
  tuned  TCP_NODELAY kept on for every accepted connection, and
         `ZMQChannelsWebsocketConnection.limit_rate=False`.

Prints `READY http://127.0.0.1:P` on stdout once the event loop serves requests (polling
`GET /api?token=T` works too; every route, /api included, answers 401 without the token). KG
logs every request to stderr, and its kernels inherit its stdout and stderr: redirect or drain
them, or a full pipe stalls the gateway. SIGTERM shuts it down with its kernels (and removes the
temp dir).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from kernel_gateway.gatewayapp import KernelGatewayApp
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop


def write_kernelspec(root: Path, python: str) -> None:
    """Writes `root/kernels/python3/kernel.json`: ipykernel as kernelbox's local backend runs it."""
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "display_name": "Python 3 (as kernelbox runs it)",
        "language": "python",
        "argv": [
            python,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--HistoryManager.hist_file=:memory:",
        ],
        "env": {
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "PYTHONPATH": str(root / "work" / "packages"),
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


def keep_nodelay_on() -> None:
    """Sets TCP_NODELAY on every connection tornado accepts and keeps it on: tornado turns it
    off again after each HTTP request, which would leave WebSocket frames to Nagle."""
    handle_stream = HTTPServer.handle_stream

    def handle_stream_nodelay(self, stream, address):  # type: ignore[no-untyped-def]
        stream.set_nodelay(True)
        stream.set_nodelay = lambda _value: None
        return handle_stream(self, stream, address)

    HTTPServer.handle_stream = handle_stream_nodelay  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["stock", "tuned"], required=True)
    parser.add_argument("--kernel-python", required=True)
    parser.add_argument("--token", default="bench")
    parser.add_argument("--transport", choices=["ipc", "tcp"], default="ipc")
    parser.add_argument("--state-dir", help="kernelspec, runtime files, kernel cwd (default: temp)")
    args = parser.parse_args()

    root = Path(args.state_dir or tempfile.mkdtemp(prefix="kg-bench-")).resolve()
    if not args.state_dir:
        atexit.register(shutil.rmtree, root, True)
    (root / "work").mkdir(parents=True, exist_ok=True)
    (root / "runtime").mkdir(exist_ok=True)
    python = os.path.abspath(shutil.which(args.kernel_python) or args.kernel_python)
    write_kernelspec(root, python)
    # JUPYTER_PATH comes before the venv's own kernelspecs; a short runtime dir keeps the ipc
    # socket paths (`<runtime>/kernel-<id>-ipc-<port>`) under the unix socket path limit.
    os.environ["JUPYTER_PATH"] = str(root)
    os.environ["JUPYTER_RUNTIME_DIR"] = str(root / "runtime")
    # KG starts kernels (POST /api/kernels has no path) in its own working directory.
    os.chdir(root / "work")

    argv = [
        "--KernelGatewayApp.ip=127.0.0.1",
        f"--KernelGatewayApp.port={args.port}",
        "--KernelGatewayApp.port_retries=0",
        f"--KernelGatewayApp.auth_token={args.token}",
        f"--KernelManager.transport={args.transport}",
    ]
    if args.mode == "tuned":
        keep_nodelay_on()
        argv.append("--ZMQChannelsWebsocketConnection.limit_rate=False")

    app = KernelGatewayApp.instance()
    app.initialize(argv)
    url = f"http://127.0.0.1:{args.port}"
    IOLoop.current().add_callback(lambda: print(f"READY {url}", flush=True))
    app.start()


if __name__ == "__main__":
    sys.exit(main())
