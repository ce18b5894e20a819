"""Checks launch.py for real: starts Kernel Gateway stock and tuned and measures each.

    python check.py --kernel-python PY [--modes stock,tuned] [--rounds 50] [--port 18888]

Run with the python of the gateway venv (it has `websockets`). For each mode: starts
`launch.py` (same python) and times it to READY, reads KG's RSS idle, creates a kernel with
POST /api/kernels (timed, and until the first kernel_info reply), reads the RSS with one kernel,
times `rounds` kernel_info and `1+1` execute round trips over the channels WebSocket (until the
shell reply, and until the iopub idle status), then runs two 20 MB stream cells (10,000 prints of
2,047 'x' + newline, without and with flush=True) and counts the stream bytes that arrive before
the idle status, sampling KG's RSS meanwhile. Prints one line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import websockets

HERE = Path(__file__).resolve().parent
TOKEN = "bench"
FLOOD = "for i in range(10000): print('x'*2047{})"
FLOOD_BYTES = 10000 * 2048


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def request(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"token {TOKEN}")
    with urllib.request.urlopen(req) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def message(msg_type: str, channel: str, session: str, content: dict) -> dict:
    """A Jupyter v5 message in the JSON form of the channels WebSocket."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": session,
            "username": "bench",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


class Client:
    """One channels WebSocket; `call` sends a request and reads until its reply and idle."""

    def __init__(self, ws) -> None:  # type: ignore[no-untyped-def]
        self.ws = ws
        self.session = uuid.uuid4().hex

    async def call(self, msg_type: str, content: dict, timeout: float = 120.0) -> dict:
        """Returns times to reply and idle (s), stream bytes, and rate-limit notices seen."""
        msg = message(msg_type, "shell", self.session, content)
        msg_id = msg["header"]["msg_id"]
        start = time.perf_counter()
        await self.ws.send(json.dumps(msg))
        out = {"reply": None, "idle": None, "stream": 0, "notices": 0}
        deadline = start + timeout
        while out["reply"] is None or out["idle"] is None:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except asyncio.TimeoutError:
                break
            m = json.loads(raw)
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = m["header"]["msg_type"]
            if m["channel"] == "shell" and kind.endswith("_reply"):
                out["reply"] = time.perf_counter() - start
            elif kind == "status" and m["content"]["execution_state"] == "idle":
                out["idle"] = time.perf_counter() - start
            elif kind == "stream":
                text = m["content"]["text"]
                if "rate exceeded" in text:
                    out["notices"] += 1
                else:
                    out["stream"] += len(text)
        return out


class RssSampler(threading.Thread):
    """Samples a process's RSS every 50 ms and keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.05)


def ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))]
    return f"median {statistics.median(samples) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


async def check(mode: str, args: argparse.Namespace) -> None:
    port = args.port
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "launch.py"), "--port", str(port), "--mode", mode,
         "--kernel-python", args.kernel_python, "--token", TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("READY"), f"launch.py said {line!r}"
        # The kernels inherit KG's stdout: keep draining it.
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        print(f"[{mode}] start to READY: {time.perf_counter() - start:.2f} s")
        time.sleep(1)
        print(f"[{mode}] KG RSS idle: {rss_mib(proc.pid):.1f} MiB")

        t = time.perf_counter()
        status, kernel = request(f"{base}/api/kernels", "POST", {"name": "python3"})
        created = time.perf_counter() - t
        print(f"[{mode}] POST /api/kernels: {status} in {created * 1000:.0f} ms, id {kernel['id']}")
        ws_url = f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels"
        async with websockets.connect(
            ws_url, additional_headers={"Authorization": f"token {TOKEN}"}, max_size=None
        ) as ws:
            client = Client(ws)
            while (await client.call("kernel_info_request", {}, timeout=1.0))["reply"] is None:
                pass
            print(f"[{mode}] POST to first kernel_info reply: {time.perf_counter() - t:.2f} s")
            print(f"[{mode}] KG RSS with 1 kernel + 1 WebSocket: {rss_mib(proc.pid):.1f} MiB")

            for msg_type, content in [
                ("kernel_info_request", {}),
                ("execute_request", {"code": "1+1", "silent": False}),
            ]:
                runs = [await client.call(msg_type, content) for _ in range(args.rounds)]
                print(f"[{mode}] {msg_type} to reply: {ms([r['reply'] for r in runs])}")
                print(f"[{mode}] {msg_type} to idle:  {ms([r['idle'] for r in runs])}")

            for flush in ["", ", flush=True"]:
                sampler = RssSampler(proc.pid)
                sampler.start()
                r = await client.call("execute_request", {"code": FLOOD.format(flush)}, 60)
                sampler.running = False
                took = r["idle"] or 60.0
                print(
                    f"[{mode}] 20 MB cell{flush or ''}: {r['stream']:,} of {FLOOD_BYTES:,} bytes"
                    f" in {took:.2f} s ({r['stream'] / took / 1e6:.1f} MB/s), idle seen:"
                    f" {r['idle'] is not None}, rate-limit notices: {r['notices']},"
                    f" KG peak RSS {sampler.peak:.1f} MiB"
                )
        status, _ = request(f"{base}/api/kernels/{kernel['id']}", "DELETE")
        print(f"[{mode}] DELETE kernel: {status}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel-python", required=True)
    parser.add_argument("--modes", default="stock,tuned")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--port", type=int, default=18888)
    args = parser.parse_args()
    for mode in args.modes.split(","):
        asyncio.run(check(mode, args))


if __name__ == "__main__":
    main()
