"""The blocking API against a real server: outputs, errors, input, timeouts, interrupts,
restarts, kernel queries and the session's lifecycle."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import Server

from kernelbox import (
    AuthenticationError,
    ExecutionAbortedError,
    ExecutionError,
    ExecutionTimeoutError,
    InputRequest,
    InputRequiredError,
    KernelboxError,
    KernelDiedError,
    Result,
    Sandbox,
    SessionNotFoundError,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_variables_live_on_between_cells(sandbox: Sandbox) -> None:
    first = sandbox.run_code("x = 41")
    assert first.results == [] and first.error is None and first.status == "ok"

    ex = sandbox.run_code("x + 1")

    assert ex.text == "42"
    assert len(ex.results) == 1
    assert ex.results[0].is_main_result
    assert ex.results[0].text == "42"
    assert ex.execution_count == (first.execution_count or 0) + 1


def test_stdout_and_stderr_reach_callbacks_and_logs_in_order(sandbox: Sandbox) -> None:
    seen: list[tuple[str, str]] = []
    code = (
        "import sys, time\n"
        "print('one', flush=True); time.sleep(0.3)\n"
        "print('two', file=sys.stderr, flush=True); time.sleep(0.3)\n"
        "print('three', flush=True)\n"
    )

    ex = sandbox.run_code(
        code,
        on_stdout=lambda text: seen.append(("stdout", text)),
        on_stderr=lambda text: seen.append(("stderr", text)),
    )

    assert seen == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]
    assert ex.logs.stdout == ["one\n", "three\n"]
    assert ex.logs.stderr == ["two\n"]
    assert ex.results == [] and ex.error is None


def test_an_exception_in_the_cell_is_reported_not_raised(sandbox: Sandbox) -> None:
    errors: list[ExecutionError] = []

    ex = sandbox.run_code("print('before')\n1 / 0", on_error=errors.append)

    assert ex.status == "error"
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert ex.error.value == "division by zero"
    assert "ZeroDivisionError" in ex.error.traceback
    assert "1 / 0" in ex.error.plain_traceback and "\x1b[" not in ex.error.plain_traceback
    assert errors == [ex.error]
    assert ex.logs.stdout == ["before\n"]
    assert sandbox.run_code("'still here'").text == "'still here'"


def test_a_matplotlib_plot_arrives_as_png_bytes(sandbox: Sandbox) -> None:
    displayed: list[Result] = []
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"

    ex = sandbox.run_code(code, on_result=displayed.append)

    pngs = [r for r in ex.results if r.png is not None]
    assert len(pngs) == 1
    png = pngs[0].png
    assert png is not None and png.startswith(PNG_SIGNATURE)
    assert not pngs[0].is_main_result
    assert "image/png" in pngs[0].formats()
    assert displayed == pngs  # without on_display, displays go to on_result


def test_displayed_html_goes_to_on_display(sandbox: Sandbox) -> None:
    displayed: list[Result] = []
    main: list[Result] = []
    code = "from IPython.display import HTML, display\ndisplay(HTML('<b>hi</b>'))\n'done'"

    ex = sandbox.run_code(code, on_display=displayed.append, on_result=main.append)

    assert [r.html for r in displayed] == ["<b>hi</b>"]
    assert [r.text for r in main] == ["'done'"]
    assert ex.results == displayed + main
    assert not ex.results[0].is_main_result and ex.results[1].is_main_result


def test_an_updated_display_replaces_its_result(sandbox: Sandbox) -> None:
    code = (
        "from IPython.display import display, update_display\n"
        "display('first', display_id='d1')\n"
        "update_display('second', display_id='d1')\n"
    )

    ex = sandbox.run_code(code)

    assert [r.text for r in ex.results] == ["'second'"]
    assert ex.results[0].display_id == "d1"


def test_input_is_answered_by_on_input(sandbox: Sandbox) -> None:
    prompts: list[InputRequest] = []

    def answer(request: InputRequest) -> str:
        prompts.append(request)
        return "Ada"

    ex = sandbox.run_code("name = input('Name? ')\nprint('hello', name)", on_input=answer)

    assert prompts == [InputRequest("Name? ", password=False)]
    assert ex.logs.stdout == ["hello Ada\n"]
    assert ex.error is None


def test_input_without_on_input_raises_a_clear_error(sandbox: Sandbox) -> None:
    with pytest.raises(InputRequiredError, match="on_input") as raised:
        sandbox.run_code("input('Name? ')")

    assert raised.value.prompt == "Name? "
    assert sandbox.run_code("1 + 1").text == "2"  # the cell was interrupted


def test_a_timeout_interrupts_the_cell_and_the_session_goes_on(sandbox: Sandbox) -> None:
    sandbox.run_code("x = 'kept'")
    started = time.monotonic()

    with pytest.raises(ExecutionTimeoutError) as raised:
        sandbox.run_code("import time\nprint('sleeping', flush=True)\ntime.sleep(60)", timeout=1)

    assert time.monotonic() - started < 20
    assert isinstance(raised.value, TimeoutError)
    execution = raised.value.execution
    assert execution is not None and execution.logs.stdout == ["sleeping\n"]
    assert execution.error is not None and execution.error.name == "KeyboardInterrupt"
    assert all(notice.startswith("CellTimeout: ") for notice in execution.notices)
    assert sandbox.run_code("x").text == "'kept'"


def test_a_cell_that_ignores_interrupts_still_times_out(sandbox: Sandbox) -> None:
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(20)"
    started = time.monotonic()

    with pytest.raises(ExecutionTimeoutError) as raised:
        sandbox.run_code(code, timeout=1)

    assert time.monotonic() - started < 40
    assert raised.value.execution is not None and raised.value.execution.error is None
    # the server restarts a kernel whose cell does not stop; the session goes on either way
    assert sandbox.run_code("'fresh'").text == "'fresh'"


def test_interrupt_from_another_thread(sandbox: Sandbox) -> None:
    def interrupt_once_started(text: str) -> None:
        threading.Timer(0.2, sandbox.interrupt).start()

    started = time.monotonic()
    ex = sandbox.run_code(
        "import time\nprint('started', flush=True)\ntime.sleep(60)",
        on_stdout=interrupt_once_started,
    )

    assert time.monotonic() - started < 20
    assert ex.status == "error"
    assert ex.error is not None and ex.error.name == "KeyboardInterrupt"
    assert sandbox.run_code("'alive'").text == "'alive'"


def test_restart_clears_variables(sandbox: Sandbox) -> None:
    sandbox.run_code("x = 1")

    sandbox.restart()

    assert sandbox.kernel_state == "idle"
    ex = sandbox.run_code("x")
    assert ex.error is not None and ex.error.name == "NameError"


def test_a_restart_aborts_the_running_cell(sandbox: Sandbox) -> None:
    def restart_once_started(text: str) -> None:
        threading.Thread(target=sandbox.restart).start()

    with pytest.raises(ExecutionAbortedError) as raised:
        sandbox.run_code(
            "import time\nprint('started', flush=True)\ntime.sleep(60)",
            on_stdout=restart_once_started,
        )

    assert not isinstance(raised.value, KernelDiedError)
    assert raised.value.execution is not None
    assert raised.value.execution.logs.stdout == ["started\n"]
    assert sandbox.run_code("1").text == "1"


def test_a_dead_kernel_raises_until_restarted(sandbox: Sandbox) -> None:
    with pytest.raises(KernelDiedError) as raised:
        sandbox.run_code("import os\nos._exit(3)")
    assert raised.value.reason == "exited with code 3"
    assert isinstance(raised.value, ExecutionAbortedError)

    with pytest.raises(KernelDiedError):
        sandbox.run_code("1")
    assert sandbox.kernel_state == "dead"

    sandbox.restart()
    assert sandbox.run_code("1 + 1").text == "2"


def test_a_failing_callback_interrupts_the_cell_and_propagates(sandbox: Sandbox) -> None:
    def explode(text: str) -> None:
        raise ValueError("callback failed")

    started = time.monotonic()
    with pytest.raises(ValueError, match="callback failed"):
        sandbox.run_code("import time\nprint('go', flush=True)\ntime.sleep(60)", on_stdout=explode)

    assert sandbox.run_code("'next'").text == "'next'"
    assert time.monotonic() - started < 20


def test_cells_from_several_threads_get_their_own_output(sandbox: Sandbox) -> None:
    outputs: dict[int, list[str]] = {}

    def run(n: int) -> None:
        ex = sandbox.run_code(f"import time\ntime.sleep(0.1)\nprint({n})\n{n} * 10")
        outputs[n] = [*ex.logs.stdout, ex.text or ""]

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert outputs == {n: [f"{n}\n", str(n * 10)] for n in range(4)}


def test_complete_is_complete_and_inspect(sandbox: Sandbox) -> None:
    sandbox.run_code("import os")

    completion = sandbox.complete("os.pat")
    assert "path" in completion.matches
    assert (completion.cursor_start, completion.cursor_end) == (3, 6)

    assert sandbox.is_complete("x = 1").status == "complete"
    pending = sandbox.is_complete("for i in range(3):")
    assert pending.status == "incomplete" and not pending.is_complete
    assert pending.indent == "    "

    doc = sandbox.inspect("len")
    assert doc.found and doc.text is not None and "Return the number of items" in doc.text


def test_connect_reopens_a_session_with_its_variables(server: Server) -> None:
    first = Sandbox(server.url, server.token)
    first.run_code("kept = 'yes'")
    first.close(kill=False)

    with Sandbox.connect(server.url, server.token, first.session_id) as again:
        assert again.session_id == first.session_id
        assert again.run_code("kept").text == "'yes'"
        assert again.get_info().id == first.session_id

    with pytest.raises(SessionNotFoundError):
        Sandbox.connect(server.url, server.token, first.session_id)


def test_a_closed_sandbox_refuses_work(server: Server) -> None:
    sb = Sandbox(server.url, server.token)
    sb.close()
    sb.close()  # idempotent

    with pytest.raises(KernelboxError, match="closed"):
        sb.run_code("1")


def test_a_wrong_token_is_an_authentication_error(server: Server) -> None:
    with pytest.raises(AuthenticationError) as raised:
        Sandbox(server.url, "not-the-token")
    assert raised.value.status == 401
    assert "token" in str(raised.value)


def test_an_unknown_session_is_not_found(server: Server) -> None:
    with pytest.raises(SessionNotFoundError) as raised:
        Sandbox.connect(server.url, server.token, "no-such-session")
    assert raised.value.status == 404
    assert "no-such-session" in str(raised.value)


def test_an_unreachable_server_is_a_network_error() -> None:
    from kernelbox import NetworkError

    with pytest.raises(NetworkError) as raised:
        Sandbox("http://127.0.0.1:9", "token", request_timeout=5)
    assert isinstance(raised.value, ConnectionError)
