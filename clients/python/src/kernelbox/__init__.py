"""kernelbox: run code in sandboxed Jupyter kernels on a kernelbox server.

::

    from kernelbox import Sandbox

    with Sandbox("http://127.0.0.1:8888", token) as sb:
        sb.run_code("x = 41")
        execution = sb.run_code("x + 1")
        print(execution.text)            # 42

:class:`Sandbox` is the blocking API, :class:`AsyncSandbox` the asyncio one; both give back
:class:`Execution` objects and raise the errors in :mod:`kernelbox.errors`.
"""

from .async_sandbox import AsyncSandbox
from .errors import (
    AuthenticationError,
    ExecutionAbortedError,
    ExecutionTimeoutError,
    InputRequiredError,
    KernelboxError,
    KernelDiedError,
    NetworkError,
    SandboxFileNotFoundError,
    ServerError,
    SessionNotFoundError,
)
from .files import AsyncFiles, Files
from .models import (
    Completeness,
    Completion,
    Execution,
    ExecutionError,
    FileInfo,
    InputRequest,
    Inspection,
    Logs,
    Result,
    SessionInfo,
)
from .sandbox import Sandbox

__version__ = "0.1.0"

__all__ = [
    "AsyncFiles",
    "AsyncSandbox",
    "AuthenticationError",
    "Completeness",
    "Completion",
    "Execution",
    "ExecutionAbortedError",
    "ExecutionError",
    "ExecutionTimeoutError",
    "FileInfo",
    "Files",
    "InputRequest",
    "InputRequiredError",
    "Inspection",
    "KernelDiedError",
    "KernelboxError",
    "Logs",
    "NetworkError",
    "Result",
    "Sandbox",
    "SandboxFileNotFoundError",
    "ServerError",
    "SessionInfo",
    "SessionNotFoundError",
    "__version__",
]
