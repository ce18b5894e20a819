"""Sans-I/O state of one running cell: turns the cell's events into an :class:`Execution`,
says which callback to call with what, and decides how the cell ended. Shared by
:class:`~kernelbox.Sandbox` and :class:`~kernelbox.AsyncSandbox`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._protocol import Event
from .errors import (
    ExecutionAbortedError,
    ExecutionTimeoutError,
    KernelboxError,
    KernelDiedError,
    ServerError,
)
from .models import Execution, ExecutionError, FileInfo, InputRequest, Result

T = TypeVar("T")

TIMEOUT_GRACE = 30.0
"""Seconds past a cell's timeout the SDK waits for the server to end it (the server interrupts
the cell, then restarts the kernel if it does not stop) before giving up on its own."""

SERVER_NOTICES = frozenset({"Rejected", "CellTimeout", "OutputLimit"})
"""``error`` events (with an empty traceback) that are the server's, not the cell's."""


@dataclass(frozen=True)
class Callbacks(Generic[T]):
    """The user's output callbacks. ``T`` is what they return: ``object`` for the blocking
    API, ``object`` or an awaitable for the asyncio one (the caller awaits it)."""

    on_stdout: Callable[[str], T] | None = None
    on_stderr: Callable[[str], T] | None = None
    on_result: Callable[[Result], T] | None = None
    on_display: Callable[[Result], T] | None = None
    on_error: Callable[[ExecutionError], T] | None = None


@dataclass(frozen=True)
class Step(Generic[T]):
    """What the caller does after an event: call a callback, and/or answer an input prompt."""

    call: Callable[[], T] | None = None
    input: InputRequest | None = None


class CellRun(Generic[T]):
    """One cell from ``execute`` to ``done``."""

    def __init__(
        self,
        cell_id: str,
        callbacks: Callbacks[T],
        timeout: float | None,
        dead_reason: str | None,
    ) -> None:
        self.cell_id = cell_id
        self.execution = Execution(cell_id=cell_id)
        self.finished = False
        self._callbacks = callbacks
        self._timeout = timeout
        self._started: float | None = None
        self._dead_reason = dead_reason
        self._rejection: str | None = None
        self._failure: KernelboxError | None = None

    def deadline(self) -> float | None:
        """When (``time.monotonic()``) to stop waiting on the server: the timeout plus a grace,
        counted from when the kernel started the cell. None while it waits in the queue."""
        if self._timeout is None or self._started is None:
            return None
        return self._started + self._timeout + TIMEOUT_GRACE

    def feed(self, event: Event) -> Step[T] | None:
        """Takes one event of the cell (or a session-wide ``kernel`` event)."""
        kind = event.get("type")
        handler = _HANDLERS.get(str(kind))
        return handler(self, event) if handler else None

    def outcome(self) -> Execution:
        """The finished cell's :class:`Execution`, or the error that ended it."""
        ex = self.execution
        if self._failure is not None:
            raise self._failure
        if ex.status == "timeout":
            limit = f"{self._timeout}s" if self._timeout else "the server's limit"
            told = f" ({'; '.join(ex.notices)})" if ex.notices else ""
            raise ExecutionTimeoutError(f"the cell ran longer than {limit}{told}", ex)
        if ex.status == "aborted":
            if self._dead_reason is not None:
                raise KernelDiedError(self._dead_reason, ex)
            raise ExecutionAbortedError(
                "the cell was aborted: the kernel restarted or the session was closed", ex
            )
        if ex.status == "rejected":
            if self._dead_reason is not None:
                raise KernelDiedError(self._dead_reason, ex)
            raise ServerError(self._rejection or "the server rejected the cell")
        return ex

    def gave_up(self) -> ExecutionTimeoutError:
        """The error for a cell the server did not finish in time."""
        return ExecutionTimeoutError(
            f"the cell ran longer than {self._timeout}s and did not stop when interrupted",
            self.execution,
        )

    # Event handlers -------------------------------------------------------------------

    def _status(self, event: Event) -> Step[T] | None:
        if event.get("state") == "busy" and self._started is None:
            self._started = time.monotonic()
        return None

    def _stream(self, event: Event) -> Step[T] | None:
        text = str(event.get("text", ""))
        if event.get("name") == "stderr":
            self.execution.logs.stderr.append(text)
            return self._call(self._callbacks.on_stderr, text)
        self.execution.logs.stdout.append(text)
        return self._call(self._callbacks.on_stdout, text)

    def _execute_result(self, event: Event) -> Step[T] | None:
        result = _result(event, main=True)
        self.execution.results.append(result)
        count = event.get("execution_count")
        if isinstance(count, int):
            self.execution.execution_count = count
        return self._call(self._callbacks.on_result, result)

    def _display_data(self, event: Event) -> Step[T] | None:
        result = _result(event, main=False)
        self.execution.results.append(result)
        return self._call(self._on_display(), result)

    def _update_display_data(self, event: Event) -> Step[T] | None:
        result = _result(event, main=False)
        results = self.execution.results
        for i, old in enumerate(results):
            if result.display_id is not None and old.display_id == result.display_id:
                results[i] = result
                break
        else:
            results.append(result)
        return self._call(self._on_display(), result)

    def _error(self, event: Event) -> Step[T] | None:
        name, value = str(event.get("ename", "")), str(event.get("evalue", ""))
        if "seq" not in event:
            # Not the cell's exception: the server could not take the request at all.
            self._failure = ServerError(f"{name}: {value}")
            self.finished = True
            return None
        if name in SERVER_NOTICES and not event.get("traceback"):
            if name == "Rejected":
                self._rejection = value  # a `done {status: rejected}` follows
            else:
                self.execution.notices.append(f"{name}: {value}")
            return None
        lines = event.get("traceback") or []
        error = ExecutionError(name, value, "\n".join(str(line) for line in lines))
        self.execution.error = error
        return self._call(self._callbacks.on_error, error)

    def _input_request(self, event: Event) -> Step[T] | None:
        prompt = str(event.get("prompt", ""))
        return Step(input=InputRequest(prompt, bool(event.get("password", False))))

    def _done(self, event: Event) -> Step[T] | None:
        ex = self.execution
        ex.status = str(event.get("status", "ok"))
        count, duration = event.get("execution_count"), event.get("duration_ms")
        if isinstance(count, int):
            ex.execution_count = count
        if isinstance(duration, int):
            ex.duration_ms = duration
        files = event.get("files")
        if isinstance(files, list):
            ex.files = [FileInfo.from_json(f) for f in files if isinstance(f, dict)]
        self.finished = True
        return None

    def _kernel(self, event: Event) -> Step[T] | None:
        state = event.get("state")
        if state == "dead":
            self._dead_reason = str(event.get("reason") or "the kernel is dead")
        elif state in ("starting", "idle", "busy"):
            self._dead_reason = None
        return None

    # Helpers ---------------------------------------------------------------------------

    def _on_display(self) -> Callable[[Result], T] | None:
        return self._callbacks.on_display or self._callbacks.on_result

    @staticmethod
    def _call(callback: Callable[[Any], T] | None, value: Any) -> Step[T] | None:
        if callback is None:
            return None
        return Step(call=lambda: callback(value))


_HANDLERS: dict[str, Callable[[CellRun[Any], Event], Step[Any] | None]] = {
    "status": CellRun._status,
    "stream": CellRun._stream,
    "execute_result": CellRun._execute_result,
    "display_data": CellRun._display_data,
    "update_display_data": CellRun._update_display_data,
    "error": CellRun._error,
    "input_request": CellRun._input_request,
    "done": CellRun._done,
    "kernel": CellRun._kernel,
}


def _result(event: Event, main: bool) -> Result:
    data = event.get("data")
    metadata = event.get("metadata")
    transient = event.get("transient")
    display_id = transient.get("display_id") if isinstance(transient, dict) else None
    return Result(
        data=data if isinstance(data, dict) else {},
        is_main_result=main,
        metadata=metadata if isinstance(metadata, dict) else {},
        display_id=display_id if isinstance(display_id, str) else None,
    )
