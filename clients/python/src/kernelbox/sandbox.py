"""The blocking API: :class:`Sandbox`."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Callable
from types import TracebackType

from . import _protocol, _replies
from ._cell import Callbacks, CellRun
from ._protocol import Event
from ._rest import RestClient
from ._sync_connection import Inbox, SyncConnection
from .errors import (
    ExecutionTimeoutError,
    InputRequiredError,
    KernelboxError,
    SessionNotFoundError,
)
from .files import Files
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

DEFAULT_URL = "http://127.0.0.1:8888"


def resolve(url: str | None, token: str | None) -> tuple[str, str]:
    """``url`` and ``token``, defaulting to ``$KERNELBOX_URL`` and ``$KERNELBOX_TOKEN``."""
    url = url or os.environ.get("KERNELBOX_URL") or DEFAULT_URL
    token = token or os.environ.get("KERNELBOX_TOKEN")
    if not token:
        raise KernelboxError("no token: pass token=... or set KERNELBOX_TOKEN")
    return url, token


class Sandbox:
    """A session on a kernelbox server: a sandboxed Jupyter kernel whose variables live on
    from one :meth:`run_code` to the next.

    ::

        with Sandbox("http://127.0.0.1:8888", token) as sb:
            sb.run_code("x = 41")
            print(sb.run_code("x + 1").text)   # 42

    Creating one starts a session; :meth:`close` (or leaving the ``with`` block) deletes it.
    :meth:`connect` attaches to a session that exists already. A sandbox may be used from
    several threads: cells run one at a time in the order they were sent, and
    :meth:`interrupt` may be called while another thread waits in :meth:`run_code`.

    Args:
        url: The server, e.g. ``http://127.0.0.1:8888`` (default ``$KERNELBOX_URL``).
        token: Its API token (default ``$KERNELBOX_TOKEN``).
        network: Ask for network access for the kernel (the server must allow it).
        env: Extra environment variables for the kernel.
        session_id: Attach to this existing session instead of creating one.
        request_timeout: Seconds to wait for the server on HTTP requests, to connect, and
            for replies to :meth:`complete`, :meth:`is_complete` and :meth:`inspect`.
        reconnect_timeout: Seconds to keep trying to resume a dropped connection.

    Raises:
        AuthenticationError: The token is wrong.
        SessionNotFoundError: ``session_id`` names no session.
        ServerError: The server refused (e.g. too many sessions).
        NetworkError: The server cannot be reached.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        network: bool = False,
        env: dict[str, str] | None = None,
        session_id: str | None = None,
        request_timeout: float = 30.0,
        reconnect_timeout: float = 30.0,
    ) -> None:
        url, token = resolve(url, token)
        self._rest = RestClient(url, token, request_timeout)
        self._request_timeout = request_timeout
        if session_id is None:
            info = self._rest.create_session(network, env)
        else:
            info = self._rest.get_session(session_id)
        self.session_id: str = info.id
        """The session's id (give it to :meth:`connect` to reopen the session)."""
        self.files: Files = Files(self._rest, info.id)
        """The session's working directory: ``sb.files.write("data.csv", text)``, ``read``,
        ``list``, ``remove``."""
        self._connection = SyncConnection(
            url, info.ws_path, token, timeout=request_timeout, reconnect_timeout=reconnect_timeout
        )
        try:
            self._connection.open()
        except BaseException:
            if session_id is None:
                self._delete_quietly()
            raise
        self._closed = False

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
    ) -> Sandbox:
        """Starts a new session (the same as ``Sandbox(url, token, ...)``)."""
        return cls(
            url,
            token,
            network=network,
            env=env,
            request_timeout=request_timeout,
            reconnect_timeout=reconnect_timeout,
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
    ) -> Sandbox:
        """Attaches to the existing session ``session_id``, with its variables.

        Raises:
            SessionNotFoundError: There is no such session.
        """
        return cls(
            url,
            token,
            session_id=session_id,
            request_timeout=request_timeout,
            reconnect_timeout=reconnect_timeout,
        )

    # Running code ----------------------------------------------------------------------

    def run_code(
        self,
        code: str,
        *,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        on_result: Callable[[Result], object] | None = None,
        on_display: Callable[[Result], object] | None = None,
        on_error: Callable[[ExecutionError], object] | None = None,
        on_input: Callable[[InputRequest], str] | None = None,
        timeout: float | None = None,
    ) -> Execution:
        """Runs ``code`` as one cell and waits for it to finish.

        The callbacks are called in this thread, in order, as the output arrives.

        Args:
            code: Python source (IPython syntax: ``%magics`` and ``!shell`` work too).
            on_stdout: Each chunk the cell prints to standard output.
            on_stderr: Each chunk written to standard error.
            on_result: The value of the last expression; also displayed outputs (plots,
                HTML, ...) unless ``on_display`` is given.
            on_display: Displayed outputs (``display_data``), and updates of them.
            on_error: The exception the cell raised.
            on_input: Answers ``input()``: gets an :class:`InputRequest`, returns the line.
            timeout: Seconds the cell may run once it started (waiting behind other cells
                does not count); the server then interrupts it.

        Returns:
            The :class:`Execution`: results, logs, and the cell's exception in ``.error``
            (an exception in the cell is not raised here).

        Raises:
            ExecutionTimeoutError: The cell ran past ``timeout`` (it was interrupted).
            InputRequiredError: The cell called ``input()`` and ``on_input`` is None (it was
                interrupted).
            KernelDiedError: The kernel died (e.g. out of memory); :meth:`restart` it.
            ExecutionAbortedError: The kernel was restarted while the cell waited or ran.
            NetworkError: The connection dropped and could not be resumed.

        If a callback raises, or the wait is interrupted (Ctrl-C), the cell is interrupted
        and the exception propagates.
        """
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
        callbacks: Callbacks[object] = Callbacks(
            on_stdout, on_stderr, on_result, on_display, on_error
        )
        cell: CellRun[object] = CellRun(
            _protocol.new_id(), callbacks, timeout, self._connection.dead_reason
        )
        frame = _protocol.execute(cell.cell_id, code, timeout)
        inbox = self._connection.request(cell.cell_id, frame)
        try:
            while not cell.finished:
                event = _next(inbox, cell.deadline())
                if event is None:
                    raise cell.gave_up()
                step = cell.feed(event)
                if step is not None and step.call is not None:
                    step.call()
                if step is not None and step.input is not None:
                    if on_input is None:
                        raise InputRequiredError(step.input.prompt, cell.execution)
                    self._connection.send(_protocol.input_reply(on_input(step.input)))
        except BaseException:
            if not cell.finished:
                self._interrupt_quietly()
            raise
        finally:
            self._connection.release(cell.cell_id)
        return cell.outcome()

    def interrupt(self) -> None:
        """Interrupts the running cell (it ends with a ``KeyboardInterrupt`` error). Safe to
        call from another thread while :meth:`run_code` waits."""
        self._connection.send(_protocol.interrupt())

    def restart(self, timeout: float = 60.0) -> None:
        """Restarts the kernel and waits until it is ready: variables are lost, imports must
        be done again; a running cell ends with :class:`ExecutionAbortedError`.

        Raises:
            KernelDiedError: The new kernel did not start.
            ExecutionTimeoutError: It was not ready within ``timeout`` seconds.
        """
        watch_id = _protocol.new_id()  # never sent: the inbox gets kernel state changes
        inbox = self._connection.subscribe(watch_id)
        try:
            self._connection.send(_protocol.restart())
            watch = _replies.RestartWatch()
            deadline = time.monotonic() + timeout
            while not watch.done:
                event = _next(inbox, deadline)
                if event is None:
                    raise ExecutionTimeoutError(f"the kernel did not restart within {timeout}s")
                watch.feed(event)
        finally:
            self._connection.release(watch_id)

    # Asking the kernel -----------------------------------------------------------------

    def complete(self, code: str, cursor: int | None = None) -> Completion:
        """Completions for ``code`` at ``cursor`` (a character index; default: the end)."""
        request_id = _protocol.new_id()
        position = len(code) if cursor is None else cursor
        event = self._ask(request_id, _protocol.complete(request_id, code, position))
        return _replies.completion(event)

    def is_complete(self, code: str) -> Completeness:
        """Whether ``code`` is a complete statement, or needs more lines (``indent``)."""
        request_id = _protocol.new_id()
        return _replies.completeness(self._ask(request_id, _protocol.is_complete(request_id, code)))

    def inspect(self, code: str, cursor: int | None = None, detail_level: int = 0) -> Inspection:
        """Documentation of the object at ``cursor`` (default: the end of ``code``);
        ``detail_level=1`` adds its source."""
        request_id = _protocol.new_id()
        position = len(code) if cursor is None else cursor
        frame = _protocol.inspect(request_id, code, position, detail_level)
        return _replies.inspection(self._ask(request_id, frame))

    def _ask(self, request_id: str, frame: str) -> Event:
        query = _replies.Query(request_id, self._connection.kernel_state)
        inbox = self._connection.request(request_id, frame)
        deadline = time.monotonic() + self._request_timeout
        try:
            while query.reply is None:
                event = _next(inbox, deadline)
                if event is None:
                    raise ExecutionTimeoutError(
                        f"the kernel did not answer within {self._request_timeout}s"
                    )
                if query.feed(event):
                    self._connection.release(request_id)
                    inbox = self._connection.request(request_id, frame)
            return query.reply
        finally:
            self._connection.release(request_id)

    # The session -----------------------------------------------------------------------

    def get_info(self) -> SessionInfo:
        """The session as the server sees it (kernel state, execution count, ...)."""
        return self._rest.get_session(self.session_id)

    @property
    def kernel_state(self) -> str:
        """The kernel's last known state: ``starting``, ``idle``, ``busy``, ``restarting``,
        ``dead`` or ``closed``."""
        return self._connection.kernel_state

    def close(self, kill: bool = True) -> None:
        """Closes the connection and, with ``kill`` (the default), deletes the session and its
        kernel. With ``kill=False`` the session lives on for :meth:`connect`."""
        if self._closed:
            return
        self._closed = True
        self._connection.close()
        if kill:
            with contextlib.suppress(SessionNotFoundError):  # already gone is fine
                self._rest.delete_session(self.session_id)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sandbox {self.session_id} {self.kernel_state}>"

    def _interrupt_quietly(self) -> None:
        with contextlib.suppress(KernelboxError):
            self.interrupt()

    def _delete_quietly(self) -> None:
        with contextlib.suppress(KernelboxError):
            self._rest.delete_session(self.session_id)


def _next(inbox: Inbox, deadline: float | None) -> Event | None:
    """The next event, None once ``deadline`` (monotonic) has passed; raises a connection
    error handed over by the reader."""
    try:
        if deadline is None:
            item = inbox.get()
        else:
            item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None
    if isinstance(item, BaseException):
        raise item
    return item
