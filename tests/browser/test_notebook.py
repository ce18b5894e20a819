"""The kernelbox notebook in a real browser (headless Chromium driven by Playwright).

Run through tests/browser/run.sh, which starts a kernelbox server and passes its address and
token in KERNELBOX_URL and KERNELBOX_TOKEN (and the browser in CHROMIUM).

The tests share one page and one session, in file order, like a person working through a
notebook. Any error the page logs or throws fails the test during which it happened.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "target" / "artifacts" / "notebook.png"

URL = os.environ.get("KERNELBOX_URL", "")
TOKEN = os.environ.get("KERNELBOX_TOKEN", "")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

#: Kernel start and cells may be slow on a loaded machine or with the Docker backend.
SLOW = 60_000
expect.set_options(timeout=15_000)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not URL or not TOKEN:
        pytest.fail("KERNELBOX_URL and KERNELBOX_TOKEN are not set: run tests/browser/run.sh")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


class PageProblems:
    """Errors the page logged (console.error, CSP violations) or threw (uncaught exceptions)."""

    def __init__(self, page: Page) -> None:
        self.items: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.items.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.items.append(f"page error: {e}"))

    def take(self) -> list[str]:
        items, self.items = self.items, []
        return items

    def take_blocked_scripts(self, page: Page) -> int:
        """Waits for the reports of user scripts the page's policy blocked and removes them
        (other problems stay); returns how many there were."""
        blocked = "Content Security Policy directive 'script-src"
        for _ in range(50):
            if any(blocked in p for p in self.items):
                break
            page.wait_for_timeout(100)
        page.wait_for_timeout(200)
        kept = [p for p in self.items if blocked not in p]
        count = len(self.items) - len(kept)
        self.items = kept
        return count


@pytest.fixture(scope="module")
def session(browser: Browser) -> Iterator[tuple[Page, PageProblems]]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(SLOW)
    problems = PageProblems(page)
    yield page, problems
    context.close()


@pytest.fixture()
def page(session: tuple[Page, PageProblems]) -> Iterator[Page]:
    """The shared page; fails the test when the page logged or threw an error during it."""
    page, problems = session
    yield page
    assert problems.take() == [], "the page reported errors"


def cells(page: Page) -> Locator:
    return page.locator("#notebook .cell")


_probes = itertools.count()


def run_cell(page: Page, code: str, *, typed: bool = False) -> Locator:
    """Enters `code` into the focused (empty) cell, runs it with Shift-Enter and returns it.

    `typed` types key by key (the editor's own keys apply: auto-indent on Enter, …); otherwise
    the text is filled in at once. The cell is tagged so it can be found wherever it moves.
    """
    focused = page.locator("#notebook .cell textarea:focus")
    expect(focused).to_have_count(1)
    expect(focused).to_have_value("")
    probe = f"cell-{next(_probes)}"
    focused.evaluate("(t, probe) => { t.dataset.probe = probe; }", probe)
    editor = page.locator(f"textarea[data-probe='{probe}']")
    if typed:
        editor.press_sequentially(code)
    else:
        editor.fill(code)
    editor.press("Shift+Enter")
    return page.locator("#notebook .cell").filter(has=editor)


def wait_done(cell: Locator, state: str = "ok") -> None:
    expect(cell).to_have_attribute("data-state", state, timeout=SLOW)


# ---------------------------------------------------------------------------------------------


def test_token_form_then_a_session(page: Page, session: tuple[Page, PageProblems]) -> None:
    page.goto(URL)
    expect(page.locator("#login")).to_be_visible()
    # A wrong token is refused and asked again (the browser logs the 401 it got).
    page.fill("#token", "not-the-token")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("That token was not accepted.")
    expect(page.locator("#login")).to_be_visible()
    page.wait_for_timeout(200)
    reported = session[1].take()
    assert reported and all("401" in p for p in reported), reported
    page.fill("#token", TOKEN)
    page.click("#login-submit")
    expect(page.locator("#login")).to_be_hidden()
    expect(page).to_have_url(re.compile(r"#session=[0-9a-f-]{36}$"))
    expect(page.locator("#kernel-status")).to_have_text("idle", timeout=SLOW)
    expect(cells(page)).to_have_count(1)
    expect(cells(page).first.locator("textarea")).to_be_focused()


def test_variables_live_on_between_cells(page: Page) -> None:
    first = run_cell(page, "x = 41", typed=True)
    wait_done(first)
    expect(first.locator(".exec-count")).to_have_text("[1]:")
    second = run_cell(page, "x + 1", typed=True)
    wait_done(second)
    expect(second.locator(".output")).to_have_text("42")
    expect(second.locator(".exec-count")).to_have_text("[2]:")
    # Shift-Enter on the last cell made a new one and moved there.
    expect(cells(page)).to_have_count(3)
    expect(cells(page).nth(2).locator("textarea")).to_be_focused()


def test_editor_indents(page: Page) -> None:
    editor = page.locator("#notebook .cell textarea:focus")
    editor.press_sequentially("for i in range(3):")
    editor.press("Enter")
    editor.press_sequentially("print(i)")
    expect(editor).to_have_value("for i in range(3):\n    print(i)")
    editor.press("Shift+Tab")
    expect(editor).to_have_value("for i in range(3):\nprint(i)")
    # Tab after code completes (nothing to complete after a bracket); at a line's start it indents.
    editor.press("Tab")
    expect(editor).to_have_value("for i in range(3):\nprint(i)")
    editor.press("Home")
    editor.press("Tab")
    expect(editor).to_have_value("for i in range(3):\n    print(i)")
    height = editor.evaluate("t => t.clientHeight")
    assert height >= 2 * 18, f"the editor grew to fit two lines ({height}px)"
    editor.press("Shift+Enter")
    cell = cells(page).nth(2)
    wait_done(cell)
    expect(cell.locator(".stream-output")).to_have_text("0\n1\n2\n")


def test_tab_completes(page: Page) -> None:
    editor = page.locator("#notebook .cell textarea:focus")
    editor.press_sequentially("import collections; collections.Ordered")
    editor.press("Tab")
    expect(editor).to_have_value("import collections; collections.OrderedDict")
    # Several matches: a pick list; Enter takes the selected one.
    editor.fill("import collections; collections.de")
    editor.press("End")
    editor.press("Tab")
    options = page.locator(".cell .completions:visible li")
    expect(options.first).to_be_visible()
    assert options.count() >= 2
    texts = options.all_inner_texts()
    assert "deque" in texts or "collections.deque" in texts, texts
    editor.press("ArrowDown")
    selected = page.locator(".cell .completions li.selected").inner_text()
    editor.press("Enter")
    expect(page.locator(".cell .completions:visible")).to_have_count(0)
    assert editor.input_value().endswith(selected.split(".")[-1])
    editor.fill("")
    # Escape, then Tab leaves the editor (keyboard users are not trapped in it).
    editor.evaluate("t => { t.dataset.probe = 'tabbing'; }")
    tagged = page.locator("textarea[data-probe='tabbing']")
    tagged.press("Escape")
    tagged.press("Tab")
    expect(tagged).not_to_be_focused()
    expect(tagged).to_have_value("")
    tagged.focus()


def test_matplotlib_png(page: Page) -> None:
    cell = run_cell(
        page,
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.title('squares')\n"
        "plt.show()",
    )
    wait_done(cell)
    img = cell.locator(".output img")
    expect(img).to_have_count(1)
    src = img.get_attribute("src")
    assert src and src.startswith("data:image/png;base64,")
    png = base64.b64decode(src.split(",", 1)[1])
    assert png.startswith(PNG_SIGNATURE)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    assert img.evaluate("img => img.naturalWidth") > 100


def test_ansi_colours(page: Page) -> None:
    cell = run_cell(page, r'print("\033[31mred alert\033[0m plain \033[1;32mbold green\033[0m")')
    wait_done(cell)
    red = cell.locator(".output span.ansi-red-fg")
    expect(red).to_have_text("red alert")
    expect(red).to_have_css("color", "rgb(231, 92, 88)")
    green = cell.locator(".output span.ansi-green-fg.ansi-bold")
    expect(green).to_have_text("bold green")
    expect(cell.locator(".output")).to_have_text("red alert plain bold green\n")
    # Markup in printed text is shown, not interpreted.
    cell = run_cell(page, 'print("<b>not bold</b>")')
    wait_done(cell)
    expect(cell.locator(".output")).to_have_text("<b>not bold</b>\n")
    expect(cell.locator(".output b")).to_have_count(0)


def test_traceback_is_coloured(page: Page) -> None:
    cell = run_cell(page, "1 / 0")
    wait_done(cell, "error")
    error = cell.locator(".output .error-output")
    expect(error).to_contain_text("ZeroDivisionError")
    expect(error).to_contain_text("division by zero")
    expect(error.locator("span.ansi-red-fg").first).to_be_visible()
    assert "\x1b" not in error.inner_text()


def test_html_only_in_a_sandboxed_frame(
    page: Page, session: tuple[Page, PageProblems]
) -> None:
    cell = run_cell(
        page,
        "from IPython.display import HTML, display\n"
        "rows = ''.join(f'<tr><td>row {i}</td><td>{i * i}</td></tr>' for i in range(8))\n"
        "display(HTML('<p id=\"hello\">html works</p><table>' + rows + '</table>'))",
    )
    wait_done(cell)
    frame = cell.locator(".output iframe.html-output")
    expect(frame).to_have_count(1)
    sandbox = frame.get_attribute("sandbox")
    assert sandbox is not None and "allow-scripts" in sandbox.split()
    assert "allow-same-origin" not in sandbox
    assert 'id="hello"' in (frame.get_attribute("srcdoc") or "")
    # The page cannot reach into the frame (an opaque origin), and the HTML is not in the page.
    assert frame.evaluate("f => f.contentDocument === null")
    expect(page.locator("#hello")).to_have_count(0)
    inside = page.frame_locator("iframe.html-output >> nth=0")
    expect(inside.locator("#hello")).to_have_text("html works")
    expect(inside.locator("tr")).to_have_count(8)
    # The frame reported its height and was fitted to the table.
    page.wait_for_function(
        "f => f.getBoundingClientRect().height > 120", arg=frame.element_handle()
    )

    # The user's own scripts do not run, not even inside the frame (it inherits the page's
    # policy); the browser reports the blocked script, and nothing else may go wrong.
    cell = run_cell(
        page,
        "display(HTML('<p id=\"target\">untouched</p>"
        "<script>document.getElementById(\"target\").textContent = \"script ran\"</script>'))",
    )
    wait_done(cell)
    inside = page.frame_locator("iframe.html-output >> nth=1")
    expect(inside.locator("#target")).to_have_text("untouched")
    _, problems = session
    assert problems.take_blocked_scripts(page) >= 1


def test_display_updates_and_clear_output(page: Page) -> None:
    shown = run_cell(page, "h = display('v1', display_id=True)\nh.update('v2')")
    wait_done(shown)
    expect(shown.locator(".output")).to_have_text("'v2'")
    # A later cell updates the display where it is.
    later = run_cell(page, "h.update('v3')")
    wait_done(later)
    expect(shown.locator(".output")).to_have_text("'v3'")
    expect(later.locator(".output")).to_be_empty()

    cell = run_cell(
        page,
        "from IPython.display import display, clear_output\n"
        "h = display('first', display_id=True)\n"
        "h.update('second')\n"
        "print('gone soon')\n"
        "clear_output(wait=True)\n"
        "print('after clear')",
    )
    wait_done(cell)
    expect(cell.locator(".output")).to_have_text("after clear\n")


def test_input_answered_inline(page: Page) -> None:
    cell = run_cell(page, 'name = input("Your name: ")\nprint("Hello, " + name)')
    box = cell.locator(".output .input-box")
    expect(box).to_be_visible()
    expect(cell.locator(".input-prompt")).to_contain_text("Your name:")
    expect(box).to_be_focused()
    box.fill("Ada")
    box.press("Enter")
    wait_done(cell)
    expect(cell.locator(".output .stream-output")).to_have_text("Hello, Ada\n")
    expect(cell.locator(".input-value")).to_have_text("Ada")


def test_interrupt(page: Page) -> None:
    cell = run_cell(page, 'import time\nprint("sleeping", flush=True)\ntime.sleep(60)')
    expect(cell.locator(".output")).to_contain_text("sleeping")
    expect(page.locator("#kernel-status")).to_have_text("busy")
    expect(cell.locator(".exec-count")).to_have_text("[*]:")
    page.click("#interrupt")
    # Now and then the kernel's SIGINT misses its main thread (ipykernel signals the process):
    # press again, as a person would.
    for _ in range(5):
        try:
            expect(cell).to_have_attribute("data-state", "error", timeout=3_000)
            break
        except AssertionError:
            print("the cell still runs after an interrupt: pressing again")
            page.click("#interrupt")
    wait_done(cell, "error")
    expect(cell.locator(".error-output")).to_contain_text("KeyboardInterrupt")
    expect(page.locator("#kernel-status")).to_have_text("idle")


def test_cell_moves_and_deletes(page: Page) -> None:
    page.click("#add-cell")
    count = cells(page).count()
    last = cells(page).nth(count - 1)
    last.locator("textarea").fill("# moved")
    last.locator("[data-action=move-up]").click()
    expect(cells(page).nth(count - 2).locator("textarea")).to_have_value("# moved")
    cells(page).nth(count - 2).locator("[data-action=delete]").click()
    expect(cells(page)).to_have_count(count - 1)


def test_reload_reopens_the_session(page: Page, session: tuple[Page, PageProblems]) -> None:
    url = page.url
    page.reload()
    expect(page.locator("#login")).to_be_hidden()
    assert page.url == url
    expect(page.locator("#kernel-status")).to_have_text("idle", timeout=SLOW)
    # Sources come back from this tab's storage, outputs from the server's replay.
    expect(cells(page).nth(1).locator("textarea")).to_have_value("x + 1")
    expect(cells(page).nth(1).locator(".output")).to_have_text("42")
    expect(cells(page).nth(1).locator(".exec-count")).to_have_text("[2]:")
    expect(page.locator(".output img")).to_have_count(1)
    # The HTML output with a script is shown again, its script blocked again.
    expect(page.locator("iframe.html-output")).to_have_count(2)
    assert session[1].take_blocked_scripts(page) >= 1
    # The replayed input() prompt is shown as no longer waiting, followed by what came after.
    expect(page.locator(".input-request.unanswered .input-prompt")).to_contain_text("Your name:")
    expect(page.locator(".input-box")).to_have_count(0)
    # The kernel kept its variables.
    last = cells(page).last
    last.locator("textarea").click()
    if last.locator("textarea").input_value():
        page.click("#add-cell")
    cell = run_cell(page, "x * 2")
    wait_done(cell)
    expect(cell.locator(".output")).to_have_text("82")


def test_screenshot(page: Page) -> None:
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    # Chromium paints sandboxed (out-of-process) frames only inside the viewport: make the
    # viewport as tall as the page so the HTML output is in the picture too.
    viewport = page.viewport_size
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": viewport["width"], "height": height})
    page.wait_for_timeout(300)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.set_viewport_size(viewport)
    assert SCREENSHOT.read_bytes().startswith(PNG_SIGNATURE)


class CuttableProxy:
    """A TCP proxy in front of the server whose connections the test can cut (a network drop)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.refusing = False
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, *, refuse: bool) -> None:
        """Cuts every connection; while `refuse`, new ones are closed at once."""
        self.refusing = refuse
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.sockets.clear()

    def close(self) -> None:
        self.cut(refuse=True)
        self.listener.close()


def test_reconnects_and_replays_after_a_network_drop(browser: Browser) -> None:
    """A second tab through a proxy: the connection drops mid-cell, the page shows
    "reconnecting", resumes with replay, and the cell's output is complete and not doubled."""
    target = urlsplit(URL)
    proxy = CuttableProxy((target.hostname, target.port))
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(SLOW)
    problems = PageProblems(page)
    try:
        page.goto(proxy.url)
        page.fill("#token", TOKEN)
        page.click("#login-submit")
        expect(page.locator("#kernel-status")).to_have_text("idle")
        cell = run_cell(
            page, "import time\nfor i in range(12):\n    print(i, flush=True)\n    time.sleep(0.2)"
        )
        expect(cell.locator(".output")).to_contain_text("2")
        proxy.cut(refuse=True)
        expect(page.locator("#kernel-status")).to_have_text("reconnecting")
        expect(page.locator("#kernel-status")).to_have_attribute("data-state", "reconnecting")
        page.wait_for_timeout(800)
        proxy.refusing = False
        wait_done(cell)
        expect(page.locator("#kernel-status")).to_have_text("idle")
        expected = "".join(f"{i}\n" for i in range(12))
        assert cell.locator(".stream-output").evaluate("e => e.textContent") == expected
    finally:
        context.close()
        proxy.close()
    # The browser itself logs each refused reconnect attempt (the WebSocket, and the request
    # that asks whether the session still exists); anything else is a problem.
    network = re.compile(r"WebSocket connection to .* failed|Failed to load resource: net::ERR_")
    unexpected = [p for p in problems.take() if not network.search(p)]
    assert unexpected == [], f"the page reported errors: {unexpected}"


def test_restart(page: Page) -> None:
    page.click("#restart")
    expect(page.locator("#kernel-status")).to_have_text("idle", timeout=SLOW)
    cell = run_cell(page, "x")
    wait_done(cell, "error")
    expect(cell.locator(".error-output")).to_contain_text("NameError")
    expect(cell.locator(".exec-count")).to_have_text("[1]:")
