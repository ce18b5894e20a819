"""The asyncio API: :class:`AsyncSandbox`, the twin of :class:`~kernelbox.Sandbox`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any

from . import _protocol, _replies
from ._async_connection import AsyncConnection, AsyncInbox
from ._cell import Callbacks, CellRun
from ._protocol import Event
from ._rest import RestClient
from .errors import (
    ExecutionTimeoutError,
    InputRequiredError,
    KernelboxError,
    SessionNotFoundError,
)
from .files import AsyncFiles
from .models import (
    Completeness,
    Completion,
    Execution,
    ExecutionError,
    InputRequest,
    Inspection,
    Result,
    SessionInfo,
)
from .sandbox import resolve


class AsyncSandbox:
    """A session on a kernelbox server, for asyncio code. Open one with :meth:`create` or
    :meth:`connect`, both of which may be awaited or used with ``async with``::

        async with AsyncSandbox.create("http://127.0.0.1:8888", token) as sb:
            await sb.run_code("x = 41")
            print((await sb.run_code("x + 1")).text)   # 42

    Everything works as in :class:`~kernelbox.Sandbox`; the methods are coroutines, and the
    callbacks may be plain functions or coroutine functions.
    """

    def __init__(
        self, rest: RestClient, info: SessionInfo, connection: AsyncConnection, timeout: float
    ) -> None:
        """Use :meth:`create` or :meth:`connect`."""
        self._rest = rest
        self._connection = connection
        self._request_timeout = timeout
        self._closed = False
        self.session_id: str = info.id
        """The session's id (give it to :meth:`connect` to reopen the session)."""
        self.files: AsyncFiles = AsyncFiles(rest, info.id)
        """The session's working directory: ``await sb.files.write(...)``, ``read``, ``list``,
        ``remove``."""

    @classmethod
    def create(
        cls,
        url: str | None = None,
        token: str | None = None,
        *,
        network: bool = False,
        env: dict[str, str] | None = None,
        request_timeout: float = 30.0,
        reconnect_timeout: float = 30.0,
    ) -> _Opening:
        """Starts a new session. Arguments as for :class:`~kernelbox.Sandbox`."""
        return _Opening(
            cls._open(url, token, network, env, None, request_timeout, reconnect_timeout)
        )

    @classmethod
    def connect(
        cls,
        url: str | None,
        token: str | None,
        session_id: str,
        *,
        request_timeout: float = 30.0,
        reconnect_timeout: float = 30.0,
    ) -> _Opening:
        """Attaches to the existing session ``session_id``, with its variables."""
        return _Opening(
            cls._open(url, token, False, None, session_id, request_timeout, reconnect_timeout)
        )

    @classmethod
    async def _open(
        cls,
        url: str | None,
        token: str | None,
        network: bool,
        env: dict[str, str] | None,
        session_id: str | None,
        request_timeout: float,
        reconnect_timeout: float,
    ) -> AsyncSandbox:
        url, token = resolve(url, token)
        rest = RestClient(url, token, request_timeout)
        if session_id is None:
            info = await asyncio.to_thread(rest.create_session, network, env)
        else:
            info = await asyncio.to_thread(rest.get_session, session_id)
        connection = AsyncConnection(
            url, info.ws_path, token, timeout=request_timeout, reconnect_timeout=reconnect_timeout
        )
        try:
            await connection.open()
        except BaseException:
            if session_id is None:
                await asyncio.to_thread(_delete_quietly, rest, info.id)
            raise
        return cls(rest, info, connection, request_timeout)

    # Running code ----------------------------------------------------------------------

    async def run_code(
        self,
        code: str,
        *,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        on_result: Callable[[Result], object] | None = None,
        on_display: Callable[[Result], object] | None = None,
        on_error: Callable[[ExecutionError], object] | None = None,
        on_input: Callable[[InputRequest], str | Awaitable[str]] | None = None,
        timeout: float | None = None,
    ) -> Execution:
        """Runs ``code`` as one cell and waits for it to finish; see
        :meth:`Sandbox.run_code <kernelbox.Sandbox.run_code>`. Callbacks that return
        awaitables are awaited. Cancelling the call interrupts the cell."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
        callbacks: Callbacks[object] = Callbacks(
            on_stdout, on_stderr, on_result, on_display, on_error
        )
        cell: CellRun[object] = CellRun(
            _protocol.new_id(), callbacks, timeout, self._connection.dead_reason
        )
        frame = _protocol.execute(cell.cell_id, code, timeout)
        inbox = await self._connection.request(cell.cell_id, frame)
        try:
            while not cell.finished:
                event = await _next(inbox, cell.deadline())
                if event is None:
                    raise cell.gave_up()
                step = cell.feed(event)
                if step is not None and step.call is not None:
                    await _settle(step.call())
                if step is not None and step.input is not None:
                    if on_input is None:
                        raise InputRequiredError(step.input.prompt, cell.execution)
                    answer = on_input(step.input)
                    value = await answer if inspect.isawaitable(answer) else answer
                    await self._connection.send(_protocol.input_reply(str(value)))
        except BaseException:
            if not cell.finished:
                await self._interrupt_quietly()
            raise
        finally:
            self._connection.release(cell.cell_id)
        return cell.outcome()

    async def interrupt(self) -> None:
        """Interrupts the running cell (it ends with a ``KeyboardInterrupt`` error)."""
        await self._connection.send(_protocol.interrupt())

    async def restart(self, timeout: float = 60.0) -> None:
        """Restarts the kernel and waits until it is ready; see
        :meth:`Sandbox.restart <kernelbox.Sandbox.restart>`."""
        watch_id = _protocol.new_id()
        inbox = await self._connection.subscribe(watch_id)
        try:
            await self._connection.send(_protocol.restart())
            watch = _replies.RestartWatch()
            deadline = time.monotonic() + timeout
            while not watch.done:
                event = await _next(inbox, deadline)
                if event is None:
                    raise ExecutionTimeoutError(f"the kernel did not restart within {timeout}s")
                watch.feed(event)
        finally:
            self._connection.release(watch_id)

    # Asking the kernel -----------------------------------------------------------------

    async def complete(self, code: str, cursor: int | None = None) -> Completion:
        """Completions for ``code`` at ``cursor`` (a character index; default: the end)."""
        request_id = _protocol.new_id()
        position = len(code) if cursor is None else cursor
        event = await self._ask(request_id, _protocol.complete(request_id, code, position))
        return _replies.completion(event)

    async def is_complete(self, code: str) -> Completeness:
        """Whether ``code`` is a complete statement, or needs more lines (``indent``)."""
        request_id = _protocol.new_id()
        event = await self._ask(request_id, _protocol.is_complete(request_id, code))
        return _replies.completeness(event)

    async def inspect(
        self, code: str, cursor: int | None = None, detail_level: int = 0
    ) -> Inspection:
        """Documentation of the object at ``cursor`` (default: the end of ``code``)."""
        request_id = _protocol.new_id()
        position = len(code) if cursor is None else cursor
        frame = _protocol.inspect(request_id, code, position, detail_level)
        return _replies.inspection(await self._ask(request_id, frame))

    async def _ask(self, request_id: str, frame: str) -> Event:
        query = _replies.Query(request_id, self._connection.kernel_state)
        inbox = await self._connection.request(request_id, frame)
        deadline = time.monotonic() + self._request_timeout
        try:
            while query.reply is None:
                event = await _next(inbox, deadline)
                if event is None:
                    raise ExecutionTimeoutError(
                        f"the kernel did not answer within {self._request_timeout}s"
                    )
                if query.feed(event):
                    self._connection.release(request_id)
                    inbox = await self._connection.request(request_id, frame)
            return query.reply
        finally:
            self._connection.release(request_id)

    # The session -----------------------------------------------------------------------

    async def get_info(self) -> SessionInfo:
        """The session as the server sees it."""
        return await asyncio.to_thread(self._rest.get_session, self.session_id)

    @property
    def kernel_state(self) -> str:
        """The kernel's last known state."""
        return self._connection.kernel_state

    async def close(self, kill: bool = True) -> None:
        """Closes the connection and, with ``kill`` (the default), deletes the session."""
        if self._closed:
            return
        self._closed = True
        await self._connection.close()
        if kill:
            with contextlib.suppress(SessionNotFoundError):  # already gone is fine
                await asyncio.to_thread(self._rest.delete_session, self.session_id)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.session_id} {self.kernel_state}>"

    async def _interrupt_quietly(self) -> None:
        with contextlib.suppress(KernelboxError, asyncio.CancelledError):
            await asyncio.shield(self.interrupt())


class _Opening:
    """An :class:`AsyncSandbox` being opened: ``await`` it, or use it with ``async with``
    (which closes the sandbox at the end)."""

    def __init__(self, opening: Awaitable[AsyncSandbox]) -> None:
        self._opening = opening
        self._sandbox: AsyncSandbox | None = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._opening
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.close()


async def _next(inbox: AsyncInbox, deadline: float | None) -> Event | None:
    """The next event, None once ``deadline`` (``time.monotonic()``) has passed; raises a
    connection error handed over by the reader."""
    if deadline is None:
        item = await inbox.get()
    else:
        remaining = deadline - time.monotonic()
        try:
            item = await asyncio.wait_for(inbox.get(), max(0.0, remaining))
        except asyncio.TimeoutError:
            return None
    if isinstance(item, BaseException):
        raise item
    return item


async def _settle(value: object) -> None:
    if inspect.isawaitable(value):
        await value


def _delete_quietly(rest: RestClient, session_id: str) -> None:
    with contextlib.suppress(KernelboxError):
        rest.delete_session(session_id)
