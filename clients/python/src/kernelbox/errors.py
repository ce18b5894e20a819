"""The exceptions the SDK raises. Everything it raises on purpose is a :class:`KernelboxError`.

::

    KernelboxError
    ├── AuthenticationError        the token was missing or wrong (HTTP 401)
    ├── SessionNotFoundError       no such session, or it was deleted (HTTP 404)
    ├── ServerError                any other refusal, with the server's message
    ├── NetworkError               the server could not be reached, or a dropped
    │                              connection could not be resumed (also a ConnectionError)
    ├── ExecutionTimeoutError      a cell or request ran past its timeout (also a TimeoutError)
    ├── ExecutionAbortedError      the cell was aborted (the kernel restarted)
    │   └── KernelDiedError        the kernel died (out of memory, exited, ...)
    └── InputRequiredError         the cell called input() and no on_input was given

A cell that raises an exception is *not* an SDK error: the exception is reported in
:attr:`Execution.error <kernelbox.Execution.error>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Execution


class KernelboxError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        status: The HTTP status of the response that caused it, when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class AuthenticationError(KernelboxError):
    """The server refused the token (HTTP 401)."""


class SessionNotFoundError(KernelboxError):
    """The session does not exist: a wrong id, or it was deleted (HTTP 404)."""


class SandboxFileNotFoundError(KernelboxError, FileNotFoundError):
    """No file or directory at that path in the sandbox's working directory (HTTP 404)."""


class ServerError(KernelboxError):
    """The server refused a request: ``message`` is what it said was wrong.

    Raised for HTTP errors other than 401/404 (``status`` set; e.g. 429 when the server runs
    its maximum number of sessions, 403 for network access it does not allow) and for
    requests the session rejected (``status`` None; e.g. its queue is full).
    """


class NetworkError(KernelboxError, ConnectionError):
    """The server could not be reached, or a dropped connection could not be resumed."""


class ExecutionTimeoutError(KernelboxError, TimeoutError):
    """A cell (or a request such as ``complete``) took longer than its timeout.

    For a cell, the server interrupts it; :attr:`execution` holds the output it produced
    (the ``KeyboardInterrupt`` included, when the interruption landed).
    """

    def __init__(self, message: str, execution: Execution | None = None) -> None:
        super().__init__(message)
        self.execution = execution


class ExecutionAbortedError(KernelboxError):
    """The cell was aborted before it finished: the kernel restarted (or died).

    :attr:`execution` holds the output the cell produced before.
    """

    def __init__(self, message: str, execution: Execution | None = None) -> None:
        super().__init__(message)
        self.execution = execution


class KernelDiedError(ExecutionAbortedError):
    """The kernel died (``reason``: ``out of memory``, ``exited with code N``, ...).

    Its variables are lost; :meth:`Sandbox.restart <kernelbox.Sandbox.restart>` starts a
    fresh kernel in the same session.
    """

    def __init__(self, reason: str, execution: Execution | None = None) -> None:
        super().__init__(f"the kernel died ({reason}): restart the sandbox to go on", execution)
        self.reason = reason


class InputRequiredError(KernelboxError):
    """The cell called ``input()`` but ``run_code`` got no ``on_input`` callback.

    The cell is interrupted. Pass ``on_input=lambda request: "answer"`` to answer prompts.
    """

    def __init__(self, prompt: str, execution: Execution | None = None) -> None:
        super().__init__(
            f"the cell asked for input ({prompt!r}) but run_code() got no on_input callback; "
            "the cell was interrupted"
        )
        self.prompt = prompt
        self.execution = execution


def error_for_status(status: int, message: str) -> KernelboxError:
    """The exception for an HTTP error response with ``status`` and the server's ``message``."""
    if status == 401:
        return AuthenticationError(message, status=status)
    if status == 404 and message.startswith("no such file"):
        return SandboxFileNotFoundError(message, status=status)
    if status == 404:
        return SessionNotFoundError(message, status=status)
    return ServerError(message, status=status)
