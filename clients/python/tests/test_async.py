"""The asyncio API against a real server (each test runs its own event loop)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from conftest import Server

from kernelbox import (
    AsyncSandbox,
    AuthenticationError,
    ExecutionTimeoutError,
    InputRequest,
    KernelDiedError,
    Result,
    SessionNotFoundError,
)


def run(server: Server, scenario: Callable[[AsyncSandbox], Awaitable[None]]) -> None:
    """Runs ``scenario`` with a fresh async sandbox, closed afterwards."""

    async def main() -> None:
        async with AsyncSandbox.create(server.url, server.token) as sb:
            await scenario(sb)

    asyncio.run(main())


def test_run_code_with_sync_and_async_callbacks(server: Server) -> None:
    async def scenario(sb: AsyncSandbox) -> None:
        await sb.run_code("x = 41")
        out: list[str] = []
        results: list[Result] = []

        async def on_result(result: Result) -> None:
            await asyncio.sleep(0)
            results.append(result)

        ex = await sb.run_code("print('hi')\nx + 1", on_stdout=out.append, on_result=on_result)

        assert ex.text == "42" and ex.results[0].is_main_result
        assert results == ex.results
        assert out == ["hi\n"] == ex.logs.stdout

    run(server, scenario)


def test_errors_plots_and_input(server: Server) -> None:
    async def scenario(sb: AsyncSandbox) -> None:
        ex = await sb.run_code("1 / 0")
        assert ex.error is not None and ex.error.name == "ZeroDivisionError"

        plot = await sb.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")
        png = plot.results[0].png
        assert png is not None and png.startswith(b"\x89PNG\r\n\x1a\n")

        async def answer(request: InputRequest) -> str:
            return request.prompt.upper()

        ex = await sb.run_code("print(input('abc'))", on_input=answer)
        assert ex.logs.stdout == ["ABC\n"]

    run(server, scenario)


def test_timeout_interrupt_and_restart(server: Server) -> None:
    async def scenario(sb: AsyncSandbox) -> None:
        await sb.run_code("x = 1")
        with pytest.raises(ExecutionTimeoutError) as raised:
            await sb.run_code("import time; time.sleep(60)", timeout=1)
        assert raised.value.execution is not None

        async def interrupt_soon(text: str) -> None:
            asyncio.get_running_loop().call_later(
                0.2, lambda: asyncio.ensure_future(sb.interrupt())
            )

        started = time.monotonic()
        ex = await sb.run_code(
            "import time\nprint('go', flush=True)\ntime.sleep(60)", on_stdout=interrupt_soon
        )
        assert ex.error is not None and ex.error.name == "KeyboardInterrupt"
        assert time.monotonic() - started < 20

        assert (await sb.run_code("x")).text == "1"
        await sb.restart()
        ex = await sb.run_code("x")
        assert ex.error is not None and ex.error.name == "NameError"

    run(server, scenario)


def test_cancelling_run_code_interrupts_the_cell(server: Server) -> None:
    async def scenario(sb: AsyncSandbox) -> None:
        task = asyncio.ensure_future(sb.run_code("import time; time.sleep(60)"))
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started = time.monotonic()
        assert (await sb.run_code("'next'")).text == "'next'"
        assert time.monotonic() - started < 20

    run(server, scenario)


def test_kernel_queries_and_death(server: Server) -> None:
    async def scenario(sb: AsyncSandbox) -> None:
        assert "path" in (await sb.complete("import os\nos.pat")).matches
        assert (await sb.is_complete("if True:")).status == "incomplete"
        assert (await sb.inspect("len")).found

        with pytest.raises(KernelDiedError):
            await sb.run_code("import os; os._exit(1)")
        await sb.restart()
        assert (await sb.run_code("2 + 2")).text == "4"

    run(server, scenario)


def test_open_without_context_manager_and_reconnect(server: Server) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.create(server.url, server.token)
        try:
            await sb.run_code("kept = 5")
            await sb.close(kill=False)
            again = await AsyncSandbox.connect(server.url, server.token, sb.session_id)
            assert (await again.run_code("kept")).text == "5"
            assert (await again.get_info()).id == sb.session_id
            await again.close()
        finally:
            await sb.close()

    asyncio.run(main())


def test_async_errors(server: Server) -> None:
    async def main() -> None:
        with pytest.raises(AuthenticationError):
            await AsyncSandbox.create(server.url, "wrong")
        with pytest.raises(SessionNotFoundError):
            async with AsyncSandbox.connect(server.url, server.token, "nope"):
                pass

    asyncio.run(main())
