"""Transparent reconnects: when the WebSocket drops mid-cell the SDK resumes after the last
event it saw, and the cell's output arrives complete, each piece exactly once."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import Server

from kernelbox import AsyncSandbox, Sandbox

LINES = 40
CODE = (
    "import time\n"
    f"for i in range({LINES}):\n"
    "    print(f'line {i}', flush=True)\n"
    "    time.sleep(0.03)\n"
    "'finished'"
)
EXPECTED = "".join(f"line {i}\n" for i in range(LINES))


def drop(sandbox: Sandbox, how: str) -> None:
    """Breaks the sandbox's WebSocket: a clean close, or the TCP connection cut under it."""
    ws = sandbox._connection._ws
    assert ws is not None
    if how == "close":
        ws.close()
    else:
        ws.socket.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_output_survives_a_dropped_connection_mid_cell(sandbox: Sandbox, how: str) -> None:
    seen: list[str] = []

    def on_stdout(text: str) -> None:
        seen.append(text)
        if len(seen) == 5:
            drop(sandbox, how)

    ex = sandbox.run_code(CODE, on_stdout=on_stdout)

    assert sandbox._connection.reconnects == 1
    assert "".join(ex.logs.stdout) == EXPECTED
    assert "".join(seen) == EXPECTED
    assert ex.text == "'finished'"
    assert ex.status == "ok"


def test_several_drops_in_one_cell(sandbox: Sandbox) -> None:
    seen: list[str] = []

    def on_stdout(text: str) -> None:
        seen.append(text)
        if len(seen) in (3, 10, 20):
            drop(sandbox, "shutdown")

    ex = sandbox.run_code(CODE, on_stdout=on_stdout)

    assert sandbox._connection.reconnects == 3
    assert "".join(ex.logs.stdout) == EXPECTED


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_a_cell_sent_while_the_connection_is_down_still_runs_once(
    sandbox: Sandbox, how: str
) -> None:
    sandbox.run_code("runs = 0")
    drop(sandbox, how)

    ex = sandbox.run_code("runs += 1\nruns")

    assert ex.text == "1"
    assert sandbox.run_code("runs").text == "1"


def test_the_async_api_resumes_too(server: Server) -> None:
    async def scenario() -> None:
        async with AsyncSandbox.create(server.url, server.token) as sb:
            seen: list[str] = []

            async def on_stdout(text: str) -> None:
                seen.append(text)
                if len(seen) == 5:
                    ws = sb._connection._ws
                    assert ws is not None
                    ws.transport.abort()

            ex = await sb.run_code(CODE, on_stdout=on_stdout)

            assert sb._connection.reconnects == 1
            assert "".join(ex.logs.stdout) == EXPECTED
            assert "".join(seen) == EXPECTED
            assert ex.text == "'finished'"

    asyncio.run(scenario())
