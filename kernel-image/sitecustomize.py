"""kernelbox: make SIGINT reach the thread that runs the user's code.

ipykernel interrupts a cell by sending SIGINT to its own process. The kernel has several Python
threads (iopub, control, heartbeat, ...); the operating system may deliver the signal to any of
them, and then a main thread blocked in a system call (``time.sleep``, a socket read) is not
woken: the interrupt lands only when the call returns. Blocking SIGINT in every thread but the
main one makes the operating system deliver it to the main thread, so interrupts are immediate.
Installed as ``sitecustomize`` so it runs before ipykernel starts any thread.
"""

import signal
import threading

_start_thread = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _bootstrap_inner_without_sigint(self):  # type: ignore[no-untyped-def]
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (AttributeError, OSError, ValueError):
        pass
    _start_thread(self)


threading.Thread._bootstrap_inner = _bootstrap_inner_without_sigint  # type: ignore[attr-defined]
