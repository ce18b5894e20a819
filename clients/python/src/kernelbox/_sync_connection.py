"""The blocking WebSocket connection to one session: a reader thread takes every event off the
socket and hands it to the queue of whoever waits for it; when the socket drops it reconnects
with ``?since=<last seq>`` so that nothing is missed and nothing arrives twice."""

from __future__ import annotations

import queue
import threading
import time

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from . import _protocol
from ._protocol import MAX_MESSAGE, Event, handshake_error
from ._router import Router, log
from .errors import (
    AuthenticationError,
    KernelboxError,
    NetworkError,
    SessionNotFoundError,
)

Inbox = queue.Queue[Event | BaseException]
"""What a waiter receives: its events in order, or the error that ended the connection."""


class SyncConnection:
    """One session's WebSocket, shared by every thread using the sandbox."""

    def __init__(
        self, base_url: str, ws_path: str, token: str, *, timeout: float, reconnect_timeout: float
    ) -> None:
        self._base_url = base_url
        self._ws_path = ws_path
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout
        self._reconnect_timeout = reconnect_timeout
        self._router = Router()
        self._lock = threading.RLock()
        self._inboxes: dict[str, Inbox] = {}
        self._ws: ClientConnection | None = None
        self._reader: threading.Thread | None = None
        self._closed = threading.Event()
        self.reconnects = 0
        """How many times the connection dropped and was resumed."""

    # Used by the sandbox ---------------------------------------------------------------

    def open(self) -> None:
        """Connects (or reconnects after a failure) and starts the reader; raises what went
        wrong."""
        with self._lock:
            if self._closed.is_set():
                raise KernelboxError("the sandbox is closed")
            if self._reader is not None and self._reader.is_alive():
                return
            ws = self._connect()
            self._install(ws)
            self._reader = threading.Thread(
                target=self._read, args=(ws,), name="kernelbox-reader", daemon=True
            )
            self._reader.start()

    def subscribe(self, waiter_id: str) -> Inbox:
        """A queue that receives the events of ``waiter_id`` and every kernel state change."""
        self.open()
        inbox: Inbox = queue.Queue()
        with self._lock:
            self._inboxes[waiter_id] = inbox
        return inbox

    def request(self, request_id: str, frame: str) -> Inbox:
        """Sends a request whose events carry ``request_id``; returns where they arrive."""
        inbox = self.subscribe(request_id)
        with self._lock:
            self._router.track(request_id, frame)
            if self._ws is not None:
                self._router.sent(request_id)
                self._send(self._ws, frame)
        return inbox

    def release(self, request_id: str) -> None:
        """Stops delivering events of ``request_id``."""
        with self._lock:
            self._inboxes.pop(request_id, None)
            self._router.forget(request_id)

    def send(self, frame: str) -> None:
        """Sends a frame without an id (interrupt, restart, input_reply); if the connection is
        down it goes out as soon as it is back."""
        self.open()
        with self._lock:
            if self._ws is None or not self._send(self._ws, frame):
                self._router.hold(frame)

    @property
    def kernel_state(self) -> str:
        """The kernel's last known state."""
        return self._router.kernel_state

    @property
    def dead_reason(self) -> str | None:
        """Why the kernel is dead, if it is."""
        with self._lock:
            if self._router.kernel_state != "dead":
                return None
            return self._router.kernel_reason or "the kernel is dead"

    def close(self) -> None:
        """Closes the socket and stops the reader; waiters get an error."""
        self._closed.set()
        with self._lock:
            ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=self._timeout)
        self._fail(KernelboxError("the sandbox is closed"))

    # Internals -------------------------------------------------------------------------

    def _connect(self) -> ClientConnection:
        url = _protocol.websocket_url(self._base_url, self._ws_path, self._router.since())
        try:
            ws = connect(
                url,
                additional_headers=self._headers,
                open_timeout=self._timeout,
                max_size=MAX_MESSAGE,
            )
        except InvalidStatus as e:
            raise handshake_error(e.response.status_code, bytes(e.response.body or b"")) from None
        except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as e:
            raise NetworkError(f"cannot open the session's WebSocket at {url}: {e}") from e
        # Entering the connection marks it as managed by us (websockets ≥ 17.1 warns
        # otherwise); close() ends it.
        return ws.__enter__()

    def _install(self, ws: ClientConnection) -> None:
        with self._lock:
            self._ws = ws
            self._send_all(ws, self._router.connected())

    def _send(self, ws: ClientConnection, frame: str) -> bool:
        try:
            ws.send(frame)
            return True
        except ConnectionClosed:
            return False  # the reader sees it too, and resumes

    def _send_all(self, ws: ClientConnection, frames: list[str]) -> None:
        for i, frame in enumerate(frames):
            if not self._send(ws, frame):
                self._router.not_sent(frames[i:])
                return

    def _read(self, ws: ClientConnection) -> None:
        try:
            self._read_until_closed(ws)
        except Exception as e:  # a bug: tell the waiters rather than leave them hanging
            log.exception("the reader failed")
            self._fail(KernelboxError(f"the connection's reader failed: {e!r}"))

    def _read_until_closed(self, ws: ClientConnection) -> None:
        while True:
            try:
                raw = ws.recv(timeout=self._router.replay_timeout())
            except TimeoutError:
                with self._lock:
                    self._send_all(ws, self._router.replay_expired())
                continue
            except ConnectionClosed:
                if self._closed.is_set():
                    return
                reconnected = self._reconnect()
                if reconnected is None:
                    return
                ws = reconnected
                continue
            message = _protocol.decode(raw)
            if message is not None:
                self._dispatch(ws, message)

    def _dispatch(self, ws: ClientConnection, message: Event) -> None:
        with self._lock:
            routed = self._router.route(message)
            if routed.event is not None:
                for inbox in self._targets(routed.target):
                    inbox.put(routed.event)
            if routed.lost:
                self._fail(NetworkError(f"{routed.lost} events were lost while disconnected"))
            self._send_all(ws, routed.resend)
        if routed.reconnect:
            log.info("the connection fell behind; resuming")
            ws.close()

    def _targets(self, target: str | None) -> list[Inbox]:
        """Who gets an event: the waiter for ``target``, or everybody for session events."""
        if target is None:
            return list(self._inboxes.values())
        inbox = self._inboxes.get(target)
        return [] if inbox is None else [inbox]

    def _reconnect(self) -> ClientConnection | None:
        """Connects again and resumes; None (waiters told why) when it cannot."""
        with self._lock:
            self._ws = None
        deadline = time.monotonic() + self._reconnect_timeout
        delay = 0.05
        while not self._closed.is_set():
            try:
                ws = self._connect()
            except (AuthenticationError, SessionNotFoundError) as e:
                self._fail(e)
                return None
            except KernelboxError as e:
                if time.monotonic() + delay > deadline:
                    self._fail(NetworkError(f"lost the connection and could not resume: {e}"))
                    return None
                self._closed.wait(delay)
                delay = min(delay * 2, 1.0)
                continue
            with self._lock:
                if self._closed.is_set():
                    ws.close()
                    return None
                self.reconnects += 1
                self._install(ws)
            log.info("reconnected after event %d", self._router.last_seq)
            return ws
        return None

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            for inbox in self._inboxes.values():
                inbox.put(error)
