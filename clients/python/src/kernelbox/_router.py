"""Sans-I/O bookkeeping of one session's event stream, shared by the blocking and the asyncio
connection: which events are new, who waits for them, and what to send again after a
reconnect.

* Every event the session numbers carries ``seq``. The router remembers the last one it
  passed on, drops anything at or below it (so an event is never delivered twice) and
  resumes after it when the connection drops (``?since=<last_seq>``).
* Events with an ``id`` go to whoever waits for that cell or request; ``kernel`` state
  changes go to every waiter (a cell must learn that the kernel died, a restart that it is
  back).
* A request whose frame may not have reached the server is sent again once the resumed
  connection has replayed what it missed and nothing in the replay showed the server got it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._protocol import Event

log = logging.getLogger("kernelbox")

REPLAY_GRACE = 1.0
"""Seconds to wait after ``resumed`` for the replay to show a request arrived, when the
replay's last event is one the native protocol does not show."""


@dataclass
class Routed:
    """What to do with one incoming message."""

    event: Event | None = None
    """The event to deliver, or None (a duplicate, or bookkeeping only)."""
    target: str | None = None
    """The cell or request it belongs to; None for session-wide events (every waiter)."""
    resend: list[str] = field(default_factory=list)
    """Frames to send again now: the server never got them."""
    reconnect: bool = False
    """This connection fell behind and skipped events: drop it and resume."""
    lost: int = 0
    """Events after the last one seen that the server could no longer replay."""


@dataclass
class _Pending:
    frame: str
    generation: int
    """The connection the frame last went out on (0: not sent yet)."""
    acknowledged: bool = False


class Router:
    """Per-session stream state; not thread-safe (the blocking connection locks around it)."""

    def __init__(self) -> None:
        self.last_seq = 0
        self.kernel_state = "starting"
        self.kernel_reason: str | None = None
        self.generation = 0
        self._pending: dict[str, _Pending] = {}
        self._outbox: list[str] = []
        self._replay_until: int | None = None
        self._replay_deadline: float | None = None
        self._lagging = False

    # Requests -------------------------------------------------------------------------

    def track(self, request_id: str, frame: str) -> None:
        """Remember a request until :meth:`forget`, to send it again if it may be lost."""
        self._pending[request_id] = _Pending(frame, generation=0)

    def sent(self, request_id: str) -> None:
        """The request's frame is going out on the current connection (if that fails, the
        replay after the next reconnect shows whether to send it again)."""
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.generation = self.generation

    def forget(self, request_id: str) -> None:
        """Nobody waits for the request any more."""
        self._pending.pop(request_id, None)

    def hold(self, frame: str) -> None:
        """A frame without an id (interrupt, restart, input_reply) that could not be sent:
        it goes out first on the next connection."""
        self._outbox.append(frame)

    # Connections ----------------------------------------------------------------------

    def since(self) -> int | None:
        """The ``since`` to connect with: None for a session never heard from."""
        return self.last_seq if self.generation > 0 else None

    def connected(self) -> list[str]:
        """A new connection is up; returns the frames to send on it now: the held ones and
        the requests that never went out."""
        self.generation += 1
        self._lagging = False
        self._replay_until = None
        self._replay_deadline = None
        held, self._outbox = self._outbox, []
        return held + self._take_unsent(lambda p: p.generation == 0)

    def not_sent(self, frames: list[str]) -> None:
        """Frames from :meth:`connected` or :meth:`route` that did not go out: the ones
        without an id are held again (requests go again after the next replay)."""
        requests = {p.frame for p in self._pending.values()}
        self._outbox.extend(f for f in frames if f not in requests)

    def replay_timeout(self) -> float | None:
        """Seconds until the replay counts as over without having shown its end; None when
        no replay is in progress."""
        if self._replay_deadline is None:
            return None
        return max(0.0, self._replay_deadline - time.monotonic())

    def replay_expired(self) -> list[str]:
        """The replay's grace period ran out: the frames to send again."""
        return self._finish_replay()

    # Events ---------------------------------------------------------------------------

    def route(self, message: Event) -> Routed:
        """Decides what to do with one message from the server."""
        routed = Routed()
        kind = message.get("type")
        seq = message.get("seq")
        if kind == "resumed":
            return self._resumed(message)
        if isinstance(seq, int):
            if self._lagging or seq <= self.last_seq:
                return routed
            self.last_seq = seq
        request_id = message.get("id")
        if isinstance(request_id, str):
            pending = self._pending.get(request_id)
            if pending is not None:
                pending.acknowledged = True
            routed.event, routed.target = message, request_id
        elif kind == "kernel":
            self.kernel_state = str(message.get("state", ""))
            self.kernel_reason = message.get("reason") if self.kernel_state == "dead" else None
            routed.event = message
        elif kind == "error":
            self._session_error(message, routed)
        if isinstance(seq, int) and self._replay_until is not None and seq >= self._replay_until:
            routed.resend = self._finish_replay()
        return routed

    def _resumed(self, message: Event) -> Routed:
        since = int(message.get("since") or 0)
        replayed = int(message.get("replayed") or 0)
        dropped = int(message.get("dropped") or 0)
        routed = Routed(lost=dropped)
        if dropped:
            log.warning("%d events were lost while disconnected", dropped)
        if replayed == 0:
            routed.resend = self._finish_replay()
        else:
            # The replay is the events numbered since+dropped+1 .. since+dropped+replayed.
            self._replay_until = since + dropped + replayed
            self._replay_deadline = time.monotonic() + REPLAY_GRACE
        return routed

    def _session_error(self, message: Event, routed: Routed) -> None:
        ename, evalue = message.get("ename"), message.get("evalue")
        if ename == "Lagged":
            # The server skipped events for this connection: take nothing more from it and
            # resume after the last event seen, which replays what was skipped.
            self._lagging = True
            routed.reconnect = True
        else:
            log.debug("%s: %s", ename, evalue)

    def _finish_replay(self) -> list[str]:
        self._replay_until = None
        self._replay_deadline = None
        return self._take_unsent(lambda p: not p.acknowledged and p.generation < self.generation)

    def _take_unsent(self, select: Callable[[_Pending], bool]) -> list[str]:
        frames = []
        for pending in self._pending.values():
            if select(pending):
                pending.generation = self.generation
                frames.append(pending.frame)
        return frames
