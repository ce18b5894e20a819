"""One cell's events → Execution or error, without a server (cases a live kernel makes hard)."""

from __future__ import annotations

from typing import Any

import pytest

from kernelbox import (
    ExecutionAbortedError,
    ExecutionTimeoutError,
    KernelDiedError,
    ServerError,
)
from kernelbox._cell import Callbacks, CellRun


def cell(timeout: float | None = None, dead: str | None = None) -> CellRun[object]:
    return CellRun("c1", Callbacks(), timeout, dead)


def feed(run: CellRun[object], *events: dict[str, Any]) -> None:
    for seq, event in enumerate(events, start=1):
        run.feed({"seq": seq, "id": "c1", **event})


def done(status: str) -> dict[str, Any]:
    return {"type": "done", "status": status, "execution_count": None, "duration_ms": 1}


def test_server_notices_are_kept_apart_from_the_cells_error() -> None:
    run = cell(timeout=1)
    notice = "the cell ran past its time limit (1.0 s): interrupting it"
    feed(
        run,
        {"type": "error", "ename": "CellTimeout", "evalue": notice, "traceback": []},
        {"type": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": ["tb"]},
        done("timeout"),
    )

    with pytest.raises(ExecutionTimeoutError, match="interrupting it") as raised:
        run.outcome()

    execution = raised.value.execution
    assert execution is not None
    assert execution.notices == [f"CellTimeout: {notice}"]
    assert execution.error is not None and execution.error.name == "KeyboardInterrupt"


def test_output_limit_notices_do_not_fail_the_cell() -> None:
    run = cell()
    feed(
        run,
        {"type": "stream", "name": "stdout", "text": "x" * 10},
        {"type": "error", "ename": "OutputLimit", "evalue": "dropped", "traceback": []},
        done("ok"),
    )

    execution = run.outcome()

    assert execution.error is None
    assert execution.notices == ["OutputLimit: dropped"]


def test_a_rejected_cell_raises_the_servers_message() -> None:
    run = cell()
    feed(
        run,
        {"type": "error", "ename": "Rejected", "evalue": "the queue is full", "traceback": []},
        done("rejected"),
    )

    with pytest.raises(ServerError, match="the queue is full"):
        run.outcome()


def test_a_kernel_death_explains_the_aborted_cell() -> None:
    run = cell()
    run.feed({"seq": 1, "type": "kernel", "state": "dead", "reason": "out of memory"})
    feed(run, done("aborted"))

    with pytest.raises(KernelDiedError) as raised:
        run.outcome()
    assert raised.value.reason == "out of memory"


def test_an_aborted_cell_without_a_death_was_restarted_away() -> None:
    run = cell()
    feed(run, done("aborted"))

    with pytest.raises(ExecutionAbortedError) as raised:
        run.outcome()
    assert not isinstance(raised.value, KernelDiedError)


def test_a_cell_sent_to_a_dead_kernel_says_so() -> None:
    run = cell(dead="exited with code 1")
    feed(
        run,
        {"type": "error", "ename": "Rejected", "evalue": "the kernel is dead", "traceback": []},
        done("rejected"),
    )

    with pytest.raises(KernelDiedError, match="exited with code 1"):
        run.outcome()


def test_a_frame_the_server_refused_ends_the_cell_at_once() -> None:
    run = cell()
    run.feed({"id": "c1", "type": "error", "ename": "InvalidMessage", "evalue": "bad timeout"})

    assert run.finished
    with pytest.raises(ServerError, match="bad timeout"):
        run.outcome()


def test_the_client_deadline_starts_when_the_cell_starts() -> None:
    run = cell(timeout=2)
    assert run.deadline() is None
    feed(run, {"type": "status", "state": "busy"})
    assert run.deadline() is not None
