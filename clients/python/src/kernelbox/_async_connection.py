"""The asyncio WebSocket connection to one session: the twin of :mod:`._sync_connection`, with
a reader task instead of a thread."""

from __future__ import annotations

import asyncio
import contextlib

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import _protocol
from ._protocol import MAX_MESSAGE, Event, handshake_error
from ._router import Router, log
from .errors import AuthenticationError, KernelboxError, NetworkError, SessionNotFoundError

AsyncInbox = asyncio.Queue[Event | BaseException]
"""What a waiter receives: its events in order, or the error that ended the connection."""


class AsyncConnection:
    """One session's WebSocket, shared by every task using the sandbox."""

    def __init__(
        self, base_url: str, ws_path: str, token: str, *, timeout: float, reconnect_timeout: float
    ) -> None:
        self._base_url = base_url
        self._ws_path = ws_path
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout
        self._reconnect_timeout = reconnect_timeout
        self._router = Router()
        self._inboxes: dict[str, AsyncInbox] = {}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()
        self._closed = asyncio.Event()
        self.reconnects = 0
        """How many times the connection dropped and was resumed."""

    # Used by the sandbox ---------------------------------------------------------------

    async def open(self) -> None:
        """Connects (or reconnects after a failure) and starts the reader; raises what went
        wrong."""
        async with self._opening:
            if self._closed.is_set():
                raise KernelboxError("the sandbox is closed")
            if self._reader is not None and not self._reader.done():
                return
            ws = await self._connect()
            await self._install(ws)
            self._reader = asyncio.create_task(self._read(ws), name="kernelbox-reader")

    async def subscribe(self, waiter_id: str) -> AsyncInbox:
        """A queue that receives the events of ``waiter_id`` and every kernel state change."""
        await self.open()
        inbox: AsyncInbox = asyncio.Queue()
        self._inboxes[waiter_id] = inbox
        return inbox

    async def request(self, request_id: str, frame: str) -> AsyncInbox:
        """Sends a request whose events carry ``request_id``; returns where they arrive."""
        inbox = await self.subscribe(request_id)
        self._router.track(request_id, frame)
        ws = self._ws
        if ws is not None:
            self._router.sent(request_id)
            await self._send(ws, frame)  # if this fails, the next replay shows it
        return inbox

    def release(self, request_id: str) -> None:
        """Stops delivering events of ``request_id``."""
        self._inboxes.pop(request_id, None)
        self._router.forget(request_id)

    async def send(self, frame: str) -> None:
        """Sends a frame without an id; if the connection is down it goes out once it is back."""
        await self.open()
        ws = self._ws
        if ws is not None and await self._send(ws, frame):
            return
        current = self._ws
        if current is None or current is ws:
            self._router.hold(frame)  # the reader resumes and sends it
        elif not await self._send(current, frame):
            self._router.hold(frame)

    @property
    def kernel_state(self) -> str:
        """The kernel's last known state."""
        return self._router.kernel_state

    @property
    def dead_reason(self) -> str | None:
        """Why the kernel is dead, if it is."""
        if self._router.kernel_state != "dead":
            return None
        return self._router.kernel_reason or "the kernel is dead"

    async def close(self) -> None:
        """Closes the socket and stops the reader; waiters get an error."""
        self._closed.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._fail(KernelboxError("the sandbox is closed"))

    # Internals -------------------------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        url = _protocol.websocket_url(self._base_url, self._ws_path, self._router.since())
        try:
            return await connect(
                url,
                additional_headers=self._headers,
                open_timeout=self._timeout,
                max_size=MAX_MESSAGE,
            )
        except InvalidStatus as e:
            raise handshake_error(e.response.status_code, bytes(e.response.body or b"")) from None
        except (InvalidHandshake, InvalidURI, OSError, asyncio.TimeoutError) as e:
            raise NetworkError(f"cannot open the session's WebSocket at {url}: {e}") from e

    async def _install(self, ws: ClientConnection) -> None:
        self._ws = ws
        await self._send_all(ws, self._router.connected())

    async def _send(self, ws: ClientConnection, frame: str) -> bool:
        try:
            await ws.send(frame)
            return True
        except ConnectionClosed:
            return False

    async def _send_all(self, ws: ClientConnection, frames: list[str]) -> None:
        for i, frame in enumerate(frames):
            if not await self._send(ws, frame):
                self._router.not_sent(frames[i:])
                return

    async def _read(self, ws: ClientConnection) -> None:
        try:
            await self._read_until_closed(ws)
        except Exception as e:  # a bug: tell the waiters rather than leave them hanging
            log.exception("the reader failed")
            self._fail(KernelboxError(f"the connection's reader failed: {e!r}"))

    async def _read_until_closed(self, ws: ClientConnection) -> None:
        while True:
            timeout = self._router.replay_timeout()
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout)
            except asyncio.TimeoutError:
                await self._send_all(ws, self._router.replay_expired())
                continue
            except ConnectionClosed:
                if self._closed.is_set():
                    return
                reconnected = await self._reconnect()
                if reconnected is None:
                    return
                ws = reconnected
                continue
            message = _protocol.decode(raw)
            if message is not None:
                await self._dispatch(ws, message)

    async def _dispatch(self, ws: ClientConnection, message: Event) -> None:
        routed = self._router.route(message)
        if routed.event is not None:
            for inbox in self._targets(routed.target):
                inbox.put_nowait(routed.event)
        if routed.lost:
            self._fail(NetworkError(f"{routed.lost} events were lost while disconnected"))
        await self._send_all(ws, routed.resend)
        if routed.reconnect:
            log.info("the connection fell behind; resuming")
            await ws.close()

    def _targets(self, target: str | None) -> list[AsyncInbox]:
        """Who gets an event: the waiter for ``target``, or everybody for session events."""
        if target is None:
            return list(self._inboxes.values())
        inbox = self._inboxes.get(target)
        return [] if inbox is None else [inbox]

    async def _reconnect(self) -> ClientConnection | None:
        """Connects again and resumes; None (waiters told why) when it cannot."""
        self._ws = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_timeout
        delay = 0.05
        while not self._closed.is_set():
            try:
                ws = await self._connect()
            except (AuthenticationError, SessionNotFoundError) as e:
                self._fail(e)
                return None
            except KernelboxError as e:
                if loop.time() + delay > deadline:
                    self._fail(NetworkError(f"lost the connection and could not resume: {e}"))
                    return None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)
                delay = min(delay * 2, 1.0)
                continue
            if self._closed.is_set():
                await ws.close()
                return None
            self.reconnects += 1
            await self._install(ws)
            log.info("reconnected after event %d", self._router.last_seq)
            return ws
        return None

    def _fail(self, error: BaseException) -> None:
        for inbox in self._inboxes.values():
            inbox.put_nowait(error)
