"""Server memory while a cell floods output to one client that reads and one that stopped.

    python benches/scripts/flood_memory.py [--backend docker|local] [--mb 49]

Starts the real `kernelbox serve` (target/release or target/debug), opens a session, connects a
reading WebSocket client and a stalled one (tiny receive buffer, never reads), runs a cell that
prints `--mb` MB in 16 KiB lines, and samples the server process's RSS every 50 ms. Prints the
idle RSS, the peak during the flood and the RSS after, and whether the stalled client was cut
off. Needs the `websockets` package (the SDK's test venv has it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parents[2]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="docker")
    parser.add_argument("--mb", type=int, default=49)
    args = parser.parse_args()
    binary = next(
        p for p in (ROOT / "target/release/kernelbox", ROOT / "target/debug/kernelbox") if p.exists()
    )
    token, port = secrets.token_hex(16), free_port()
    server = subprocess.Popen(
        [str(binary), "serve", "--backend", args.backend, "--ephemeral", "--pool-size", "0",
         "--token", token, "--bind", f"127.0.0.1:{port}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        req = urllib.request.Request(base + "/v1/sessions", data=b"{}", method="POST")
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Content-Type", "application/json")
        session = json.load(urllib.request.urlopen(req))["id"]
        ws_url = f"ws://127.0.0.1:{port}/v1/sessions/{session}/ws?token={token}"
        reader = await websockets.connect(ws_url, max_size=None)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", port))
        stalled = await websockets.connect(ws_url, sock=raw, max_size=None)
        while json.loads(await reader.recv()).get("state") != "idle":
            pass
        await asyncio.sleep(1)
        idle = rss_kib(server.pid)
        lines = args.mb * 1024 * 1024 // 16384
        await reader.send(json.dumps({"type": "execute", "id": "flood",
                                      "code": f"for i in range({lines}):\n    print('y' * 16383, flush=True)"}))
        peak, received, started = idle, 0, time.monotonic()
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_kib(server.pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        while True:
            event = json.loads(await reader.recv())
            if event.get("type") == "stream":
                received += len(event.get("text", ""))
            if event.get("type") == "done" and event.get("id") == "flood":
                break
        took = time.monotonic() - started
        await asyncio.sleep(12)  # past the server's patience with the stalled client
        sampling = False
        await sampler
        after = rss_kib(server.pid)
        try:
            while True:
                await asyncio.wait_for(stalled.recv(), 5)
        except websockets.ConnectionClosed as closed:
            cut = f"cut off (close code {closed.rcvd.code if closed.rcvd else 'none'})"
        except asyncio.TimeoutError:
            cut = "still connected"
        print(f"backend {args.backend}: flood of {received / 1e6:.1f} MB in {took:.1f} s "
              f"({received / 1e6 / took:.0f} MB/s) to the reading client; stalled client {cut}")
        print(f"server RSS: idle {idle / 1024:.1f} MiB, peak during flood {peak / 1024:.1f} MiB, "
              f"after {after / 1024:.1f} MiB")
        await reader.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
