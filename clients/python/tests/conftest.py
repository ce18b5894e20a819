"""Fixtures: a real kernelbox server, started once for the whole run, and a fresh sandbox on
it per test.

Environment:
    KERNELBOX_BIN           the server binary (default: <repo>/target/debug/kernelbox, built
                            with ``cargo build`` when missing)
    KERNELBOX_SDK_BACKEND   the sandbox backend to serve with (default ``local``; e.g. ``docker``)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernelbox import Sandbox

REPO = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Server:
    """A running kernelbox server."""

    url: str
    token: str

    def sessions(self) -> list[dict[str, object]]:
        """``GET /v1/sessions``."""
        request = urllib.request.Request(
            f"{self.url}/v1/sessions", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body: list[dict[str, object]] = json.load(response)
            return body


def _binary() -> Path:
    configured = os.environ.get("KERNELBOX_BIN")
    if configured:
        return Path(configured)
    binary = REPO / "target" / "debug" / "kernelbox"
    if not binary.exists():
        # Another build may hold cargo's lock: this simply waits for it.
        subprocess.run(["cargo", "build", "--quiet"], cwd=REPO, check=True)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kernelbox exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"kernelbox did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """A kernelbox server on a free port with a random token, stopped after the run; fails
    the run if a test left a session behind."""
    binary = _binary()
    backend = os.environ.get("KERNELBOX_SDK_BACKEND", "local")
    token = secrets.token_hex(16)
    url = f"http://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="kernelbox-sdk-") as tmp:
        log = Path(tmp) / "server.log"
        command = [
            str(binary), "serve",
            "--backend", backend,
            "--token", token,
            "--bind", url.removeprefix("http://"),
            "--pool-size", "0",
            "--ephemeral",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "KERNELBOX_TOKEN"}
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(url, process, log)
            server = Server(url, token)
            yield server
            left = server.sessions()
            assert not left, f"sessions left behind by the tests: {left}"
        finally:
            process.terminate()  # SIGTERM: the server removes its sandboxes
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def sandbox(server: Server) -> Iterator[Sandbox]:
    """A fresh session, deleted after the test."""
    with Sandbox(server.url, server.token) as sb:
        yield sb
