"""Socket.IO's long-polling against the real servers: default clients, browsers without WebSockets,
nginx in front of two processes, and the long-polling POSTs python-engineio would hang on
(refused at once by extras/polling_guard.py)."""
import http.client
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter

from live import (  # noqa: F401  (fixtures)
    SERVERS,
    browser,
    live_server,
    module_live_server,
    nginx,
    open_tab,
    redis_url,
    start_server,
)
from support import Listener, assert_consecutive, assert_stream_flows, disconnect_all, wait_until

# Short pings: a session nobody polls is closed, and its threads end, within seconds. The
# timeout leaves a client on a busy machine time to answer.
PING_INTERVAL = 1  # Engine.IO sends whole seconds to its clients
PING_TIMEOUT = 3
INTERVAL = 0.2
POLLING = "/socket.io/?EIO=4&transport=polling"
GUARD_LOG = "Refused a long-polling POST "  # extras/polling_guard.py's log lines start so


def serving_pid(server):
    """Return the process that serves the requests: gunicorn's worker, or the server itself."""
    pid = server.process.pid
    if "gunicorn" not in server.command[0]:
        return pid
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        (worker,) = children.read().split()
    return int(worker)


def held(pid):
    """Return what a process holds that a hung request would keep: (threads, open file descriptors)."""
    with open(f"/proc/{pid}/status") as status:
        threads = int(dict(line.split(":", 1) for line in status)["Threads"])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def baseline(pid, seconds=0.5):
    """What the process holds most of the time, sampled for a while.

    Some threads come and go: a tick's call to next_number(), a client's ping task (gone
    between its ping and the pong that starts the next one).
    """
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(held(pid))
        time.sleep(0.02)
    return statistics.mode(threads for threads, _ in samples), statistics.mode(fds for _, fds in samples)


def handshake(url):
    """Open a long-polling Engine.IO session (the open packet only); return its sid."""
    response = requests.get(url + POLLING, timeout=5)
    assert response.status_code == 200 and response.text.startswith("0{"), response.text
    return json.loads(response.text[1:])["sid"]


def send_post(url, sid, body, content_length, timeout=1.0, transport="polling"):
    """POST ``body`` to a session with this Content-Length header (None: none, the body chunked).

    Return the status code and the seconds it took, or None if no answer came within ``timeout``.
    """
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    started = time.monotonic()
    try:
        connection.putrequest("POST", f"/socket.io/?EIO=4&transport={transport}&sid={sid}")
        connection.putheader("Content-Type", "text/plain;charset=UTF-8")
        if content_length is None:
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            connection.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        else:
            connection.putheader("Content-Length", content_length)
            connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    except TimeoutError:
        return None, time.monotonic() - started
    finally:
        connection.close()


def close_a_session(url):
    """Open a long-polling session and close it as a client does, with a close packet; return the status."""
    status, _ = send_post(url, handshake(url), b"1", "1", timeout=5)
    return status


OVERSIZED = b"4" + b"x" * 10_000  # one byte over MAX_MESSAGE_SIZE
# POSTs (body, Content-Length header: "auto" is the body's length, transport parameter) that
# python-engineio 4.15.1 answers by closing the session with wait=True: the POST never gets an
# answer, and holds its thread for good. The Content-Length cases differ: see their comment.
TRIGGERS = {
    "ping": (b"2", "auto", "polling"),
    "open": (b"0", "auto", "polling"),
    "noop": (b"6", "auto", "polling"),
    "type 7": (b"7", "auto", "polling"),
    "type 8": (b"8", "auto", "polling"),
    "type 9": (b"9", "auto", "polling"),
    "JSONP ping": (b"d=2", "auto", "polling"),
    "message then ping": (b"4x\x1e2", "auto", "polling"),
    "Arabic-Indic two": ("\u0662".encode(), "auto", "polling"),  # int() reads it as 2
    "over MAX_MESSAGE_SIZE": (OVERSIZED, "auto", "polling"),
    # Engine.IO reads int(CONTENT_LENGTH) bytes: -1 reads until the client closes (gunicorn and
    # gevent refuse -1 themselves); none reads nothing and answers 200, the chunked body unread.
    "Content-Length -1": (b"2", "-1", "polling"),
    "no Content-Length": (b"2", None, "polling"),
    # Engine.IO's POST handler takes any allowed transport in the query.
    "ping, transport=websocket": (b"2", "auto", "websocket"),
}


@pytest.fixture(scope="module", params=SERVERS)
def watched_polling_server(request, module_live_server):
    """A server of each kind with short pings, and a WebSocket client that watches its stream."""
    pings = {"PING_INTERVAL": PING_INTERVAL, "PING_TIMEOUT": PING_TIMEOUT}
    server = start_server(module_live_server, request.param, INTERVAL=INTERVAL, **pings)
    watcher = Listener(server.url).connect()
    watcher.wait_for_count(3)
    # gunicorn's gthread pool starts a thread whenever none is idle, and keeps it; and a client
    # closing its connection is a task for the pool too. Let it grow to well over what the
    # tests have in flight at once (a few tasks) before they count threads.
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(close_a_session, [server.url] * 16)) == [200] * 16
    time.sleep(PING_INTERVAL)  # the closed sessions' ping tasks end after one ping interval
    yield server, serving_pid(server), watcher
    watcher.disconnect()
    server.stop()


@pytest.mark.parametrize("trigger", TRIGGERS.values(), ids=TRIGGERS.keys())
def test_a_post_engineio_would_hang_on_is_refused_at_once(watched_polling_server, trigger):
    server, pid, watcher = watched_polling_server
    body, content_length, transport = trigger
    threads_before, fds_before = baseline(pid)
    sid = handshake(server.url)
    length = str(len(body)) if content_length == "auto" else content_length
    status, seconds = send_post(server.url, sid, body, length, transport=transport)
    assert (status, seconds < 1) == (400, True), f"answered {status} after {seconds:.2f} s"

    # Neither the POST nor its session holds anything once the session's ping went unanswered.
    def let_go():
        threads, fds = held(pid)
        return threads <= threads_before and fds <= fds_before

    try:
        wait_until(let_go, timeout=PING_INTERVAL + PING_TIMEOUT, message="the server to let go")
    except AssertionError as error:
        before = (threads_before, fds_before)
        raise AssertionError(f"{error}: it holds (threads, fds) {held(pid)}, before {before}") from None
    assert_stream_flows(watcher)
    log = server.log()
    assert "Traceback" not in log
    refusals = [line.split(GUARD_LOG, 1)[1].split(" (")[0] for line in log.splitlines() if GUARD_LOG in line]
    assert len(refusals) == len(set(refusals)), refusals  # one line per kind of refusal


# Clients that use long-polling.


@pytest.mark.parametrize("kind", SERVERS)
def test_a_default_client_gets_history_and_live_numbers_and_upgrades(live_server, kind):
    server = start_server(live_server, kind, INTERVAL=INTERVAL)
    watcher = Listener(server.url).connect()
    watcher.wait_for_count(10)  # a full history
    client = Listener(server.url, transports=None)  # python-socketio's default: polling, then WebSocket
    try:
        last_id_before = server.health()["last_id"]
        client.connect()
        client.wait_for_count(15)
        assert client.ids()[0] <= last_id_before  # the history came first
        wait_until(lambda: client.client.transport() == "websocket", message="the upgrade to WebSocket")
        assert_stream_flows(client, count=5)  # nothing lost nor repeated across the upgrade
    finally:
        disconnect_all([client, watcher])


class RecordingSession(requests.Session):
    """A requests.Session that keeps the body and the status of each POST: a polling client's packets."""

    def __init__(self):
        super().__init__()
        self.posts = []

    def request(self, method, url, *args, **options):
        response = super().request(method, url, *args, **options)
        if method == "POST":
            self.posts.append((options.get("data"), response.status_code))
        return response

    def pongs(self):
        """How many pongs the server took: pong packets in POSTs answered 200."""
        packets = []
        for body, status in self.posts:
            if status == 200:
                packets += (body if isinstance(body, str) else body.decode()).split("\x1e")
        return packets.count("3")


@pytest.mark.parametrize("kind", SERVERS)
def test_a_polling_only_client_stays_connected_across_pings(live_server, kind):
    pings = {"PING_INTERVAL": PING_INTERVAL, "PING_TIMEOUT": PING_TIMEOUT}
    server = start_server(live_server, kind, INTERVAL=INTERVAL, **pings)
    session = RecordingSession()
    client = Listener(server.url, transports=["polling"], http_session=session)
    try:
        client.connect()
        # Several ping intervals: each ping answered in a POST that the server took.
        deadline = 4 * (PING_INTERVAL + PING_TIMEOUT)
        wait_until(lambda: session.pongs() >= 4, timeout=deadline, message="four pongs taken")
        assert client.client.connected and client.client.transport() == "polling"
        assert_stream_flows(client, count=5)
        assert server.health()["clients"] == 1
    finally:
        client.disconnect()


# The page, in Chromium.

# A browser on a network that refuses WebSockets: the constructor is gone before the page's scripts run.
NO_WEBSOCKET = "Object.defineProperty(window, 'WebSocket', { value: undefined });"
SHOWN_IDS = "Array.from(document.querySelectorAll('#numbers li'), li => Number(li.dataset.id))"


def page_shows_live_numbers(tab, count=5):
    """Wait until the page is live and lists at least ``count`` numbers, consecutive; return their ids."""
    wait_until(lambda: tab.page.get_attribute("#state", "data-state") == "live", message="the page live")
    wait_until(lambda: len(tab.page.evaluate(SHOWN_IDS)) >= count, timeout=15, message=f"{count} numbers")
    ids = tab.page.evaluate(SHOWN_IDS)
    assert_consecutive(ids[::-1])
    return ids


def socketio_requests(tab, transport):
    return [url for url in tab.requests if "/socket.io/" in url and f"transport={transport}" in url]


def test_page_shows_the_numbers_over_polling_without_websockets(live_server, open_tab):
    server = live_server(INTERVAL=INTERVAL)
    tab = open_tab(server.url, init_script=NO_WEBSOCKET)
    ids = page_shows_live_numbers(tab)
    wait_until(lambda: tab.page.evaluate(SHOWN_IDS)[0] > ids[0] + 5, message="more broadcasts")

    assert socketio_requests(tab, "websocket") == []
    assert len(socketio_requests(tab, "polling")) > 5  # the handshake, then a poll per broadcast or so
    assert tab.page.get_attribute("#state", "data-state") == "live"
    assert tab.errors == []


def test_page_starts_with_polling_and_upgrades_to_websocket(live_server, open_tab):
    server = live_server(INTERVAL=INTERVAL)
    tab = open_tab("about:blank")
    sent, received = [], []  # the WebSocket's frames

    def watch(websocket):
        websocket.on("framesent", lambda payload: sent.append(payload))
        websocket.on("framereceived", lambda payload: received.append(payload))

    tab.page.on("websocket", watch)
    tab.page.goto(server.url)
    page_shows_live_numbers(tab)
    wait_until(lambda: "5" in sent, message="the upgrade packet on the WebSocket")
    first_connection = next(url for url in tab.requests if "/socket.io/" in url)
    assert "transport=polling" in first_connection  # polling first, then the upgrade
    polls = len(socketio_requests(tab, "polling"))
    ids = tab.page.evaluate(SHOWN_IDS)
    wait_until(lambda: tab.page.evaluate(SHOWN_IDS)[0] > ids[0] + 5, message="more broadcasts")
    # Upgraded: the broadcasts come over the WebSocket, and the polling has stopped.
    assert len(socketio_requests(tab, "polling")) == polls
    assert [frame for frame in received if '["newnumber"' in frame]
    assert_consecutive(tab.page.evaluate(SHOWN_IDS)[::-1])
    assert tab.errors == []


# Several processes behind nginx: ip_hash keeps each client's requests on one process.


class SourceAddressAdapter(HTTPAdapter):
    """Send a requests.Session's connections from a given local address."""

    def __init__(self, address):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **options):
        super().init_poolmanager(*args, source_address=(self.address, 0), **options)


def polling_client_from(url, address):
    """A polling-only client whose requests come from ``address``: ip_hash chooses its process by it."""
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(address))
    return Listener(url, transports=["polling"], http_session=session)


def test_through_nginx_default_and_polling_clients_of_both_processes_get_the_stream(
    live_server, redis_url, nginx
):
    servers = [
        start_server(live_server, "gunicorn", MESSAGE_QUEUE=redis_url, INTERVAL=0.2, GRACE_PERIOD=2)
        for _ in range(2)
    ]
    url = nginx([server.port for server in servers])
    # Polling clients from several loopback /24s, which ip_hash spreads over both processes:
    # without sticky sessions their polls and POSTs would reach a process that has no such session.
    clients = [Listener(url, transports=None)]  # from 127.0.0.1: polling, then WebSocket
    clients += [polling_client_from(url, f"127.0.{network}.1") for network in range(1, 9)]
    try:
        for client in clients:
            client.connect()
        health = [server.health() for server in servers]
        assert all(status["clients"] >= 1 for status in health), health
        assert sum(status["clients"] for status in health) == len(clients)
        counts = [len(client.ids()) + 10 for client in clients]
        for client, count in zip(clients, counts):
            client.wait_for_count(count)
            assert_consecutive(client.ids())
        wait_until(lambda: clients[0].client.transport() == "websocket", message="the upgrade")
        assert all(client.client.transport() == "polling" for client in clients[1:])
    finally:
        disconnect_all(clients)
