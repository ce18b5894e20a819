"""The native WebSocket protocol's client side: frames to send and the URL to connect to.

Every message, both ways, is one JSON object whose ``type`` names it (see
``protocol/README.md`` in the kernelbox repository).
"""

from __future__ import annotations

import json
import urllib.parse
import uuid
from typing import Any

from .errors import KernelboxError, error_for_status

Event = dict[str, Any]
"""A server event as decoded from JSON."""

MAX_MESSAGE = 256 << 20
"""Largest event accepted (a big plot is a few MiB of base64)."""


def new_id() -> str:
    """A fresh id for a cell or request."""
    return uuid.uuid4().hex


def encode(frame: dict[str, Any]) -> str:
    """The text frame for a message."""
    return json.dumps(frame, separators=(",", ":"))


def execute(cell_id: str, code: str, timeout: float | None) -> str:
    """Queue a cell; ``timeout`` seconds after it starts the server interrupts it."""
    frame: dict[str, Any] = {"type": "execute", "id": cell_id, "code": code}
    if timeout is not None:
        frame["timeout_s"] = float(timeout)
    return encode(frame)


def interrupt() -> str:
    """Interrupt the running cell."""
    return encode({"type": "interrupt"})


def restart() -> str:
    """Restart the kernel."""
    return encode({"type": "restart"})


def input_reply(value: str) -> str:
    """Answer the pending ``input()``."""
    return encode({"type": "input_reply", "value": value})


def complete(request_id: str, code: str, cursor: int) -> str:
    """Ask for completions at ``cursor`` (unicode code points)."""
    return encode({"type": "complete", "id": request_id, "code": code, "cursor": cursor})


def is_complete(request_id: str, code: str) -> str:
    """Ask whether ``code`` is a complete statement."""
    return encode({"type": "is_complete", "id": request_id, "code": code})


def inspect(request_id: str, code: str, cursor: int, detail_level: int) -> str:
    """Ask for documentation of the object at ``cursor``."""
    return encode(
        {
            "type": "inspect",
            "id": request_id,
            "code": code,
            "cursor": cursor,
            "detail_level": detail_level,
        }
    )


def websocket_url(base_url: str, ws_path: str, since: int | None) -> str:
    """The session's WebSocket URL on the server at ``base_url`` (``http[s]://host:port``),
    resuming after event ``since`` when given."""
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"https": "wss", "wss": "wss"}.get(parts.scheme, "ws")
    path = parts.path.rstrip("/") + ws_path
    query = "" if since is None else urllib.parse.urlencode({"since": since})
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, query, ""))


def decode(text: str | bytes) -> Event | None:
    """A server event, or ``None`` for a frame that is not a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def handshake_error(status: int, body: bytes) -> KernelboxError:
    """The error for a WebSocket upgrade the server answered with HTTP ``status``."""
    message = decode(body) or {}
    text = message.get("error")
    return error_for_status(status, text if isinstance(text, str) else f"HTTP {status}")
