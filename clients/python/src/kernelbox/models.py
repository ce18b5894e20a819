"""What running code gives back: :class:`Execution` and its parts, and the replies to
completion, inspection and session queries."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class Result:
    """One rich output of a cell: the value of its last expression (``is_main_result``) or
    something it displayed (a plot, ``IPython.display.HTML(...)``, ...).

    ``data`` maps MIME types to content exactly as the kernel sent it; the properties below
    give the common formats (``None`` when the output has no such representation).
    """

    data: dict[str, Any]
    """MIME type → content (images base64-encoded, as Jupyter sends them)."""
    is_main_result: bool = False
    """True for the value of the cell's last expression (``execute_result``), False for
    displayed output (``display_data``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """MIME type → metadata (e.g. image sizes)."""
    display_id: str | None = None
    """The id that ``update_display`` targets, when the output was displayed with one."""

    def _text(self, mime: str) -> str | None:
        value = self.data.get(mime)
        if isinstance(value, list):  # multi-line strings may come as lists of lines
            value = "".join(str(v) for v in value)
        return value if isinstance(value, str) else None

    def _binary(self, mime: str) -> bytes | None:
        value = self._text(mime)
        if value is None:
            return None
        try:
            return base64.b64decode(value)
        except (binascii.Error, ValueError):
            return None

    @property
    def text(self) -> str | None:
        """``text/plain``: what ``repr`` shows, e.g. ``"42"``."""
        return self._text("text/plain")

    @property
    def html(self) -> str | None:
        """``text/html``."""
        return self._text("text/html")

    @property
    def markdown(self) -> str | None:
        """``text/markdown``."""
        return self._text("text/markdown")

    @property
    def latex(self) -> str | None:
        """``text/latex``."""
        return self._text("text/latex")

    @property
    def svg(self) -> str | None:
        """``image/svg+xml`` (the SVG document's text)."""
        return self._text("image/svg+xml")

    @property
    def javascript(self) -> str | None:
        """``application/javascript``."""
        return self._text("application/javascript")

    @property
    def png(self) -> bytes | None:
        """``image/png``, decoded: the PNG file's bytes."""
        return self._binary("image/png")

    @property
    def jpeg(self) -> bytes | None:
        """``image/jpeg``, decoded: the JPEG file's bytes."""
        return self._binary("image/jpeg")

    @property
    def pdf(self) -> bytes | None:
        """``application/pdf``, decoded."""
        return self._binary("application/pdf")

    @property
    def json(self) -> Any:
        """``application/json``: the JSON value, or ``None``."""
        return self.data.get("application/json")

    def formats(self) -> list[str]:
        """The MIME types this output has."""
        return list(self.data)

    def __str__(self) -> str:
        return self.text or ""


@dataclass
class Logs:
    """What a cell printed, in chunks as they arrived."""

    stdout: list[str] = field(default_factory=list)
    """Chunks written to standard output."""
    stderr: list[str] = field(default_factory=list)
    """Chunks written to standard error (warnings included)."""


@dataclass
class ExecutionError:
    """An exception the cell raised (it did not stop the SDK: the cell just failed)."""

    name: str
    """The exception class, e.g. ``"ZeroDivisionError"``."""
    value: str
    """Its message, e.g. ``"division by zero"``."""
    traceback: str
    """The formatted traceback, lines joined by newlines, with the kernel's ANSI colours."""

    @property
    def plain_traceback(self) -> str:
        """:attr:`traceback` without ANSI colour codes (for logs and language models)."""
        return _strip_ansi(self.traceback)

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


@dataclass
class Execution:
    """Everything one cell produced. Returned by ``run_code``."""

    results: list[Result] = field(default_factory=list)
    """Rich outputs in order: displays and the main result (see :attr:`Result.is_main_result`)."""
    logs: Logs = field(default_factory=Logs)
    """Printed text."""
    error: ExecutionError | None = None
    """The exception the cell raised, if it did."""
    execution_count: int | None = None
    """The kernel's counter for the cell (``In [n]``)."""
    status: str = "running"
    """How the cell ended: ``ok``, ``error``, ``timeout``, ``aborted`` or ``rejected``."""
    duration_ms: int | None = None
    """Time the kernel took, as the server measured it."""
    cell_id: str = ""
    """The id the SDK gave the cell on the wire."""
    notices: list[str] = field(default_factory=list)
    """What the server said about the cell, e.g. ``"OutputLimit: ... further output is
    dropped"`` or ``"CellTimeout: ... interrupting it"``."""
    files: list[FileInfo] = field(default_factory=list)
    """Files under ``output/`` the cell created or changed (read them with
    ``sandbox.files.read(f.path)``)."""

    @property
    def text(self) -> str | None:
        """The main result's text (``repr`` of the last expression), if there was one."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    @property
    def main_result(self) -> Result | None:
        """The value of the cell's last expression, if it had one."""
        for result in self.results:
            if result.is_main_result:
                return result
        return None


@dataclass(frozen=True)
class InputRequest:
    """The cell called ``input()`` (or ``getpass``): what to answer is up to ``on_input``."""

    prompt: str
    """The prompt, e.g. ``"Name? "``."""
    password: bool = False
    """True when the input should not be echoed (``getpass``)."""


@dataclass(frozen=True)
class Completion:
    """Completions at a cursor position. Replacing ``code[cursor_start:cursor_end]`` with one
    of ``matches`` completes the code."""

    matches: list[str]
    cursor_start: int
    cursor_end: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completeness:
    """Whether code is a complete statement (a REPL's "run or continue?" question)."""

    status: str
    """``complete``, ``incomplete``, ``invalid`` or ``unknown``."""
    indent: str | None = None
    """For ``incomplete``: the indentation to continue with."""

    @property
    def is_complete(self) -> bool:
        """True when the status is ``complete``."""
        return self.status == "complete"


@dataclass(frozen=True)
class Inspection:
    """Documentation of the object at a cursor position."""

    found: bool
    data: dict[str, Any] = field(default_factory=dict)
    """MIME type → documentation."""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str | None:
        """The plain-text documentation, without ANSI colours."""
        value = self.data.get("text/plain")
        return _strip_ansi(value) if isinstance(value, str) else None


@dataclass(frozen=True)
class FileInfo:
    """A file or directory in a session's working directory."""

    path: str
    """Path relative to the working directory (what the ``files`` methods take)."""
    size: int = 0
    """Size in bytes (0 for directories)."""
    modified: str = ""
    """Last modification time (RFC 3339)."""
    is_dir: bool = False
    """Whether it is a directory."""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> FileInfo:
        """Builds one from the server's JSON (unknown fields are ignored)."""
        return cls(
            path=str(body.get("path", "")),
            size=int(body.get("size") or 0),
            modified=str(body.get("modified") or ""),
            is_dir=bool(body.get("is_dir", False)),
        )


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server's REST API describes it."""

    id: str
    state: str
    """The kernel's state: ``starting``, ``idle``, ``busy``, ``restarting``, ``dead`` or
    ``closed``."""
    backend: str = ""
    created: str = ""
    last_activity: str = ""
    execution_count: int = 0
    queued: int = 0
    connections: int = 0
    ws_path: str = ""

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionInfo:
        """Builds one from the server's JSON (unknown fields are ignored)."""
        return cls(
            id=str(body["id"]),
            state=str(body.get("state", "")),
            backend=str(body.get("backend", "")),
            created=str(body.get("created", "")),
            last_activity=str(body.get("last_activity", "")),
            execution_count=int(body.get("execution_count") or 0),
            queued=int(body.get("queued") or 0),
            connections=int(body.get("connections") or 0),
            ws_path=str(body.get("ws_path") or f"/v1/sessions/{body['id']}/ws"),
        )
