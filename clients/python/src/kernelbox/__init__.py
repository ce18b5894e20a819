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
    ServerError,
    SessionNotFoundError,
)
from .models import (
    Completeness,
    Completion,
    Execution,
    ExecutionError,
    InputRequest,
    Inspection,
    Logs,
    Result,
    SessionInfo,
)
from .sandbox import Sandbox

__version__ = "0.1.0"

__all__ = [
    "AsyncSandbox",
    "AuthenticationError",
    "Completeness",
    "Completion",
    "Execution",
    "ExecutionAbortedError",
    "ExecutionError",
    "ExecutionTimeoutError",
    "InputRequest",
    "InputRequiredError",
    "Inspection",
    "KernelDiedError",
    "KernelboxError",
    "Logs",
    "NetworkError",
    "Result",
    "Sandbox",
    "ServerError",
    "SessionInfo",
    "SessionNotFoundError",
    "__version__",
]
