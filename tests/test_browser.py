"""The page in a real headless Chromium, against the real server in a subprocess.

A python-socketio client listens beside the page: at any moment the page must
show exactly the last ten numbers that client heard, newest first.
"""
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from live import browser, live_server, module_live_server, nginx, open_tab  # noqa: F401  (fixtures)
from protocol import VALUE
from sources import markup
from support import (  # noqa: F401  (listen_fixture, scheduling_delay_fixture: the fixtures)
    DEADLINE,
    Listener,
    assert_consecutive,
    listen_fixture,
    scheduling_delay_fixture,
    wait_until,
)

PROJECT = Path(__file__).resolve().parent.parent
HISTORY_SIZE = 10  # the server's default, and so the length of the page's list
SSE_PAGE = "/?transport=sse"  # the same page, fed by EventSource from /stream instead of Socket.IO
# Short, so that the list fills fast; long enough to read the page and a client between two broadcasts.
INTERVAL = 0.1
SHOWN = "Array.from(document.querySelectorAll('#numbers li'), li => [Number(li.dataset.id), li.textContent])"
# The list's numbers, oldest first, and the chart's bars in its 0..10 scale, read at the same instant.
LIST_AND_BARS = """() => {
  const chart = document.getElementById('chart');
  const scale = 10 / chart.viewBox.baseVal.height;
  return [
    Array.from(document.querySelectorAll('#numbers li'), li => Number(li.textContent)).reverse(),
    Array.from(chart.querySelectorAll('.bar'), bar => Number((bar.height.baseVal.value * scale).toFixed(3))),
  ];
}"""


# Note each number added to the list, its id and when (in seconds), from before the page's own scripts run.
RECORD_ADDITIONS = """
window.additions = [];
new MutationObserver(function (changes) {
  for (const change of changes) {
    for (const node of change.addedNodes) {
      if (node.matches && node.matches('#numbers > li')) {
        additions.push({ id: Number(node.dataset.id), time: performance.now() / 1000 });
      }
    }
  }
}).observe(document, { childList: true, subtree: true });
"""


def shown(tab):
    """Return the page's list, newest first, as (id, text) pairs."""
    return [tuple(item) for item in tab.page.evaluate(SHOWN)]


def heard(listener, count, newest=None):
    """Return the last ``count`` messages the client heard (up to id ``newest``), newest first, as the page
    should show them."""
    with listener.lock:
        messages = [message for message in listener.messages if newest is None or message["id"] <= newest]
    return [(message["id"], f"{message[VALUE]:.3f}") for message in reversed(messages[-count:])]


def state(tab):
    """Return the connection state the page shows."""
    return tab.page.get_attribute("#state", "data-state")


def brightness(tab, property_name):
    """Return the mean of the red, green and blue of a computed color of the page's body, from 0 to 1."""
    color = tab.page.evaluate(f"getComputedStyle(document.body).{property_name}")  # "rgb(13, 17, 23)"
    return sum(int(part) for part in color[color.index("(") + 1 : -1].split(",")) / 3 / 255


def wait_for_same_numbers(tab, listener, at_least=HISTORY_SIZE, timeout=DEADLINE):
    """Wait until the page lists the numbers the client heard last (at least ``at_least``); return their ids.

    A broadcast may reach one before the other, and on a busy machine the page may stay a
    broadcast or two behind the client: compare the page with what the client heard up to
    the page's newest number, which must be one the client had heard when the wait began, or newer.
    """
    size = int(tab.page.get_attribute("#feed", "data-history-size"))
    ids = listener.ids()
    caught_up_to = ids[-1] if ids else 0

    def same():
        page = shown(tab)
        if len(page) < at_least or page[0][0] < caught_up_to:
            return False
        return page == heard(listener, size, newest=page[0][0])

    try:
        wait_until(same, timeout=timeout, message="the page to list the numbers the client heard last")
    except AssertionError as error:
        raise AssertionError(f"{error}\npage:   {shown(tab)}\nclient: {heard(listener, size)}") from None
    ids = [item_id for item_id, _ in shown(tab)]
    assert_consecutive(ids[::-1])
    return ids


def server_with_history(start_server, listen, **settings):
    """Start the server and a client (``listen(url)`` connects it), and wait until the history is full;
    return both."""
    server = start_server(INTERVAL=INTERVAL, **settings)
    listener = listen(server.url)
    listener.wait_for_count(HISTORY_SIZE)
    return server, listener


@pytest.fixture(scope="module")
def watched_stream(module_live_server):
    """One server with a full history and a client, shared by the tests that only watch it."""
    listeners = []

    def listen(url):
        listeners.append(Listener(url))
        return listeners[-1].connect()

    yield server_with_history(module_live_server, listen)
    for listener in listeners:
        listener.disconnect()


def test_list_and_chart_show_the_ten_latest_numbers(live_server, listen, open_tab):
    server = live_server(INTERVAL=INTERVAL)
    tab = open_tab(server.url)
    wait_until(lambda: state(tab) == "live", message="the page to show live")
    listener = listen(server.url)

    wait_for_same_numbers(tab, listener)
    assert state(tab) == "live"
    # One bar per number, oldest on the left, as high as its number on a 0..10 scale.
    numbers, bars = tab.page.evaluate(LIST_AND_BARS)
    assert len(numbers) == HISTORY_SIZE
    assert bars == numbers


def test_two_tabs_show_the_same_numbers(watched_stream, open_tab):
    server, listener = watched_stream
    tabs = [open_tab(server.url), open_tab(server.url)]
    for tab in tabs:
        wait_for_same_numbers(tab, listener)
        assert state(tab) == "live"


def test_page_stays_on_its_origin_and_logs_no_error(watched_stream, open_tab):
    server, listener = watched_stream
    tab = open_tab(server.url)
    ids = wait_for_same_numbers(tab, listener)
    wait_until(lambda: shown(tab)[0][0] > ids[0], message="a broadcast after the history")

    assert tab.requests, "no request recorded"
    origin = urlsplit(server.url).netloc
    assert [url for url in tab.requests if urlsplit(url).netloc != origin] == []
    assert tab.errors == []


def test_sse_page_shows_the_same_numbers_without_socketio(watched_stream, open_tab):
    server, listener = watched_stream
    tab = open_tab(server.url + SSE_PAGE)
    ids = wait_for_same_numbers(tab, listener)
    wait_until(lambda: shown(tab)[0][0] > ids[0], message="a broadcast after the history")

    assert state(tab) == "live"
    paths = [urlsplit(url).path for url in tab.requests]
    assert "/stream" in paths
    # Neither the client script (/static/vendor/socket.io.min.js) nor a connection (/socket.io/).
    assert [path for path in paths if "socket.io" in path] == []
    assert tab.errors == []


def test_sse_page_opens_a_new_stream_when_one_is_refused(watched_stream, open_tab):
    server, listener = watched_stream
    tab = open_tab("about:blank")
    # What a proxy answers while the server is down: the browser's EventSource gives up on it.
    tab.page.route("**/stream", lambda route: route.fulfill(status=502, body="Bad Gateway"), times=1)
    tab.page.goto(server.url + SSE_PAGE)

    wait_until(lambda: state(tab) == "offline", message="the page to show it is offline")
    wait_until(lambda: state(tab) == "live", message="the page to open a new stream")
    wait_for_same_numbers(tab, listener)
    assert [urlsplit(url).path for url in tab.requests].count("/stream") == 2


def test_late_page_shows_the_full_history_at_once(watched_stream, open_tab, scheduling_delay):
    server, listener = watched_stream
    tab = open_tab(server.url, init_script=RECORD_ADDITIONS)
    wait_for_same_numbers(tab, listener)
    times = [addition["time"] for addition in tab.page.evaluate("additions")]
    # Ten live broadcasts would take nine intervals to arrive; the history comes in one burst,
    # which only the machine's delays (as a thread of this process saw them meanwhile) stretch.
    burst, noise = times[HISTORY_SIZE - 1] - times[0], scheduling_delay.worst()
    assert burst < 3 * INTERVAL + noise, (
        f"the history took {burst:.3f} s to show; expected under {3 * INTERVAL} s + {noise:.3f} s of "
        f"scheduling delay measured meanwhile (ten live broadcasts take {9 * INTERVAL:.1f} s): {times}"
    )


@pytest.mark.parametrize("path", ["/", SSE_PAGE], ids=["socketio", "sse"])
def test_page_reconnects_after_a_server_restart(live_server, listen, open_tab, path):
    server, listener = server_with_history(live_server, listen)
    tab = open_tab(server.url + path)
    wait_for_same_numbers(tab, listener)

    assert server.stop() == 0
    wait_until(lambda: state(tab) == "reconnecting", message="the page to show it is reconnecting")
    server.start()
    wait_until(lambda: state(tab) == "live", message="the page to show live again")
    # The new server began a new stream, its ids from 1 again: the page drops the old
    # stream's numbers and lists the new ones, though their ids are lower.
    restarted = listen(server.url)
    wait_for_same_numbers(tab, restarted)
    assert restarted.messages[-1]["stream"] == server.health()["stream"] != listener.messages[-1]["stream"]


def test_page_resumes_after_a_network_drop_without_gap_or_duplicate(live_server, listen, open_tab):
    # A history (and so a list) long enough to hold the whole test's stream, gaps included.
    server, listener = server_with_history(live_server, listen, HISTORY_SIZE=100)
    tab = open_tab(server.url, init_script=RECORD_ADDITIONS)
    wait_for_same_numbers(tab, listener)

    tab.page.context.set_offline(True)
    wait_until(lambda: state(tab) == "offline", message="the page to show it is offline")
    last_id_offline = server.health()["last_id"]
    wait_until(lambda: server.health()["last_id"] >= last_id_offline + 3, message="three broadcasts offline")
    assert shown(tab)[0][0] <= last_id_offline  # the page really missed them
    tab.page.context.set_offline(False)

    wait_until(lambda: state(tab) == "live", message="the page to show live again")
    # The whole stream, from id 1, each once and in order: what it missed was filled in.
    ids = wait_for_same_numbers(tab, listener, at_least=last_id_offline + 4)
    assert ids[-1] == 1
    # And it never showed a number twice, not even for a moment.
    added = [addition["id"] for addition in tab.page.evaluate("additions")]
    assert_consecutive(added)


def test_data_that_looks_like_markup_is_shown_as_text(live_server, open_tab):
    command = ["python", "tests/serve_with_source.py", "sources:markup", "--port", "{port}"]
    server = live_server(command=command, INTERVAL=INTERVAL)
    tab = open_tab(server.url)
    wait_until(lambda: len(shown(tab)) >= 3, message="three values")

    assert {text for _, text in shown(tab)} == {markup()}
    assert tab.page.locator("#numbers img").count() == 0
    assert tab.page.evaluate("window.injected") is None
    assert not [url for url in tab.requests if urlsplit(url).path == "/x"]  # the <img> never loaded
    assert tab.page.locator("#chart .bar").count() == 0  # text has no height
    assert tab.errors == []


def test_page_fits_a_phone_in_dark_mode(watched_stream, open_tab):
    server, listener = watched_stream
    tab = open_tab(server.url)
    tab.page.set_viewport_size({"width": 360, "height": 740})
    tab.page.emulate_media(color_scheme="dark")
    wait_for_same_numbers(tab, listener)

    assert tab.page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    chart = tab.page.locator("#chart").bounding_box()
    assert 200 <= chart["width"] <= 360
    assert brightness(tab, "backgroundColor") < 0.2 and brightness(tab, "color") > 0.8  # light on dark


def test_screenshot_script_saves_a_png(browser, tmp_path):
    # ``browser``: the script needs Chromium too, so it skips (or fails under CI) the same way.
    path = tmp_path / "screenshot.png"
    subprocess.run(
        [sys.executable, "scripts/screenshot.py", str(path)],
        cwd=PROJECT,
        env={**os.environ, "INTERVAL": "0.05"},  # fill the list fast
        check=True,
        timeout=60,
    )
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("transport", ["socketio", "sse"])
def test_page_works_under_a_sub_path_behind_nginx(live_server, nginx, open_tab, transport):
    """gunicorn with SCRIPT_NAME, nginx passing /numbers/... on unchanged (docs/deploy.md)."""
    command = ["gunicorn", "--worker-class", "gthread", "--threads", "20", "--bind", "127.0.0.1:{port}",
               "application:create_app()"]  # fmt: skip
    server = live_server(command=command, INTERVAL=INTERVAL, SCRIPT_NAME="/numbers")
    url = nginx([server.port], sub_path="/numbers")
    tab = open_tab(f"{url}/?transport={transport}")
    wait_until(lambda: len(shown(tab)) >= 3, timeout=15, message="three numbers under the sub-path")
    assert state(tab) == "live"
    assert_consecutive([item_id for item_id, _ in shown(tab)][::-1])
    assert tab.errors == []
    path = urlsplit(url).path
    assert all(urlsplit(address).path.startswith(path + "/") for address in tab.requests), tab.requests
