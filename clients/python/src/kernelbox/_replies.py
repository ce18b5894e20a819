"""Sans-I/O handling of the kernel's replies to ``complete``, ``is_complete`` and ``inspect``,
and of the kernel state a ``restart`` waits for. Shared by both APIs."""

from __future__ import annotations

from typing import Any

from ._protocol import Event
from .errors import KernelDiedError, ServerError
from .models import Completeness, Completion, Inspection


def completion(event: Event) -> Completion:
    """A ``complete_reply``."""
    matches = event.get("matches")
    return Completion(
        matches=[str(m) for m in matches] if isinstance(matches, list) else [],
        cursor_start=_int(event.get("cursor_start")),
        cursor_end=_int(event.get("cursor_end")),
        metadata=_dict(event.get("metadata")),
    )


def completeness(event: Event) -> Completeness:
    """An ``is_complete_reply``."""
    indent = event.get("indent")
    return Completeness(
        status=str(event.get("status", "unknown")),
        indent=indent if isinstance(indent, str) else None,
    )


def inspection(event: Event) -> Inspection:
    """An ``inspect_reply``."""
    return Inspection(
        found=bool(event.get("found", False)),
        data=_dict(event.get("data")),
        metadata=_dict(event.get("metadata")),
    )


class Query:
    """Waits for the reply to one ``complete``/``is_complete``/``inspect`` request.

    The server rejects these while the kernel is starting or restarting (unlike cells,
    which wait in the queue); then the query waits until the kernel is idle and asks again.
    """

    def __init__(self, request_id: str, kernel_state: str) -> None:
        self.request_id = request_id
        self.reply: Event | None = None
        self._state = kernel_state
        self._reason: str | None = None
        self._rejected = False

    def feed(self, event: Event) -> bool:
        """Takes one event; True when the query should be sent again. Raises if it failed."""
        if event.get("type") == "kernel":
            self._state = str(event.get("state", ""))
            self._reason = event.get("reason")
            if self._rejected and self._state == "idle":
                self._rejected = False
                return True
            if self._rejected and self._state == "dead":
                raise KernelDiedError(self._reason or "the kernel is dead")
            return False
        if event.get("id") != self.request_id:
            return False
        if event.get("type") != "error":
            self.reply = event
            return False
        if self._state == "dead":
            raise KernelDiedError(self._reason or "the kernel is dead")
        if self._state in ("starting", "restarting") and "seq" in event:
            self._rejected = True  # ask again once the kernel is up
            return False
        raise ServerError(f"{event.get('ename')}: {event.get('evalue')}")


class RestartWatch:
    """Follows ``kernel`` events after a ``restart`` was sent: done once the kernel went
    through ``restarting`` and came back ``idle``."""

    def __init__(self) -> None:
        self._restarting = False
        self.done = False

    def feed(self, event: Event) -> None:
        """Takes one event; raises :class:`KernelDiedError` if the new kernel died."""
        if event.get("type") != "kernel":
            return
        state = event.get("state")
        if state == "restarting":
            self._restarting = True
        elif self._restarting and state == "idle":
            self.done = True
        elif self._restarting and state == "dead":
            raise KernelDiedError(str(event.get("reason") or "the kernel did not come back"))


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
