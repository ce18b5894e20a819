"""The sans-I/O stream bookkeeping, without a server: duplicates, resume, what to send again."""

from __future__ import annotations

from typing import Any

import pytest

from kernelbox import _router
from kernelbox._router import Router


def event(seq: int | None, kind: str = "stream", **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": kind, **fields}
    if seq is not None:
        message["seq"] = seq
    return message


def connected(router: Router) -> list[str]:
    """A first connection (no ``since``), as the connections do it."""
    assert router.since() is None
    return router.connected()


def test_events_are_delivered_once_in_order() -> None:
    router = Router()
    connected(router)

    first = router.route(event(5, id="c1"))
    again = router.route(event(5, id="c1"))
    older = router.route(event(3, id="c1"))

    assert first.event is not None and first.target == "c1"
    assert again.event is None and older.event is None
    assert router.last_seq == 5
    assert router.since() == 5


def test_kernel_events_go_to_everybody_and_track_the_state() -> None:
    router = Router()
    connected(router)

    greeting = router.route(event(None, "kernel", state="idle"))
    death = router.route(event(7, "kernel", state="dead", reason="out of memory"))

    assert greeting.event is not None and greeting.target is None
    assert death.target is None
    assert (router.kernel_state, router.kernel_reason) == ("dead", "out of memory")


def test_a_request_that_never_went_out_is_sent_on_the_next_connection() -> None:
    router = Router()
    connected(router)
    router.track("c1", "frame-1")  # the connection was down: never sent
    router.hold("interrupt")

    assert router.connected() == ["interrupt", "frame-1"]
    assert router.connected() == []


def test_a_sent_request_goes_again_only_if_the_replay_does_not_show_it() -> None:
    router = Router()
    connected(router)
    router.track("seen", "frame-seen")
    router.sent("seen")
    router.track("lost", "frame-lost")
    router.sent("lost")
    router.route(event(10, id="other"))

    assert router.connected() == []
    resumed = router.route(event(None, "resumed", since=10, replayed=3, dropped=0))
    assert resumed.resend == [] and router.replay_timeout() is not None
    assert router.route(event(11, "accepted", id="seen")).resend == []
    # seq 12 is not shown by the native protocol; 13 ends the replay
    end = router.route(event(13, "kernel", state="busy"))

    assert end.resend == ["frame-lost"]
    assert router.replay_timeout() is None


def test_a_replay_ending_in_hidden_events_ends_after_its_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_router, "REPLAY_GRACE", 0.0)
    router = Router()
    connected(router)
    router.track("c1", "frame-1")
    router.sent("c1")
    router.connected()
    router.route(event(None, "resumed", since=0, replayed=2, dropped=0))

    assert router.replay_timeout() == 0.0
    assert router.replay_expired() == ["frame-1"]


def test_an_empty_replay_sends_again_at_once() -> None:
    router = Router()
    connected(router)
    router.track("c1", "frame-1")
    router.sent("c1")
    router.connected()

    resumed = router.route(event(None, "resumed", since=0, replayed=0, dropped=0))

    assert resumed.resend == ["frame-1"]


def test_lost_events_are_reported() -> None:
    router = Router()
    connected(router)
    router.connected()

    resumed = router.route(event(None, "resumed", since=4, replayed=1, dropped=6))

    assert resumed.lost == 6


def test_a_lagging_connection_takes_nothing_more_and_resumes() -> None:
    router = Router()
    connected(router)
    router.route(event(4, id="c1"))

    lagged = router.route(event(None, "error", ename="Lagged", evalue="missed 3 events"))
    skipped = router.route(event(9, id="c1"))

    assert lagged.reconnect and skipped.event is None
    assert router.since() == 4
    router.connected()
    assert router.route(event(5, id="c1")).event is not None


def test_replies_to_this_connection_only_are_routed_without_seq() -> None:
    router = Router()
    connected(router)

    local = router.route(event(None, "error", id="c1", ename="InvalidMessage", evalue="bad"))

    assert local.event is not None and local.target == "c1"
    assert router.last_seq == 0
