"""Hostile and faulty conditions against the real server: bad input on the wire, clients that vanish
or stop reading, a number source that fails. Each case checks that the stream flows on for the others.

The 10,000 connect/disconnect cycles are a soak test, left out of the default run:
``python -m pytest -m soak``.
"""
import contextlib
import http.client
import json
import logging
import queue
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import websocket

from extras.hardening import SECURITY_HEADERS
from live import SERVERS, live_server, module_live_server, start_server  # noqa: F401  (fixtures)
from protocol import NAMESPACE
from support import (  # noqa: F401  (listen_fixture, scheduling_delay_fixture: the fixtures)
    DEADLINE,
    ENGINEIO_PATH,
    Listener,
    assert_consecutive,
    assert_stops_promptly,
    assert_stream_flows,
    drop_without_close,
    join_namespace,
    listen_fixture,
    open_websocket,
    process_resources,
    scheduling_delay_fixture,
    wait_until,
)
from test_handlers import WRONG_RESUME_DATA

logger = logging.getLogger(__name__)  # the figures the README's "Reliability" section quotes


class RawClients:
    """Raw WebSocket clients (see support.open_websocket), each closed when the test ends.

    One thread answers the pings of the ``answering`` clients, so that they stay connected
    however long it takes to connect the others, until they ``vanish``.
    """

    def __init__(self):
        self.connections = []
        self.event_streams = []  # (connection, response) of each GET /stream
        self._lock = threading.Lock()  # connections are opened from many threads at once
        self._requests = queue.SimpleQueue()  # for the answering thread: clients to answer, vanish requests
        self._stopping = threading.Event()
        self._answerer = threading.Thread(target=self._answer_pings, daemon=True)

    def open(self, url, **options):
        connection = open_websocket(url, **options)
        with self._lock:
            self.connections.append(connection)
        return connection

    def join(self, url, answering=False):
        """Open a client and connect it to the namespace; answer its pings from now on if ``answering``."""
        connection = self.open(url)
        assert join_namespace(connection).startswith(f"40{NAMESPACE},")
        if answering:
            with self._lock:
                if not self._answerer.is_alive():
                    self._answerer.start()
            self._requests.put(connection)
        return connection

    def _answer_pings(self):
        """Read every answering client's packets (broadcasts too); answer each ping "2" with a pong "3"."""
        with selectors.DefaultSelector() as selector:
            while not self._stopping.is_set():
                while not self._requests.empty():
                    request = self._requests.get()
                    if isinstance(request, threading.Event):  # from vanish()
                        for key in list(selector.get_map().values()):
                            selector.unregister(key.fileobj)
                            drop_without_close(key.data)
                        request.set()
                    else:
                        selector.register(request.sock, selectors.EVENT_READ, request)
                for key, _ in selector.select(timeout=0.1):
                    try:
                        packet = key.data.recv()
                        if packet == "2":
                            key.data.send("3")
                    except (OSError, websocket.WebSocketException):
                        packet = ""
                    if packet == "":  # closed by the server: the test sees it in the count
                        selector.unregister(key.fileobj)

    def vanish(self):
        """Drop every answering client at once, with no close frame: their network vanished."""
        done = threading.Event()
        self._requests.put(done)
        if self._answerer.is_alive():
            assert done.wait(DEADLINE), f"the answering thread did not drop its clients within {DEADLINE} s"

    def close(self):
        """Close every client at once (no close handshake with a server that may be gone)."""
        self._stopping.set()
        if self._answerer.is_alive():
            self._answerer.join()
        for connection in self.connections:
            connection.shutdown()
        for connection, response in self.event_streams:
            if response is not None:
                response.close()
            connection.close()

    def open_event_stream(self, url):
        """GET /stream; return the response, unread (the kernel's buffers take what it is sent meanwhile)."""
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
        self.event_streams.append((connection, None))
        connection.request("GET", "/stream")
        response = connection.getresponse()
        self.event_streams[-1] = (connection, response)
        assert response.status == 200, response.status
        return response


def read_ids(response, count):
    """Read the ids of the next ``count`` events of an event stream."""
    ids = []
    while len(ids) < count:
        line = response.readline().decode()
        assert line, f"the stream ended after ids {ids}"
        if line.startswith("id: "):
            ids.append(int(line.removeprefix("id: ")))
    return ids


@pytest.fixture
def raw_clients():
    """A ``RawClients``: every client it opened is closed after the test, however the test ends."""
    clients = RawClients()
    yield clients
    clients.close()


# Bad input on the wire. One server takes every case in turn while a well-behaved
# client watches its stream; after each case the stream must still flow to it.


@pytest.fixture(scope="module")
def watched_server(module_live_server):
    """One server for all the bad-input cases, and a well-behaved client listening to it."""
    server = module_live_server(INTERVAL=0.05)
    watcher = Listener(server.url).connect()
    yield server, watcher
    watcher.disconnect()


@contextlib.contextmanager
def shrugged_off(watched_server):
    """Yield the server's URL; afterwards the stream still flows and the log grew by one line at most."""
    server, watcher = watched_server
    log_before = server.log()
    yield server.url
    assert_stream_flows(watcher)
    assert server.health()["status"] == "ok"
    log_after = server.log()
    new_lines = log_after[len(log_before):].splitlines()
    assert len(new_lines) <= 1, new_lines
    assert "Traceback" not in log_after


MALFORMED_PACKETS = {
    "empty": "",
    "unknown Engine.IO type": "9",
    "not Engine.IO at all": "hello",
    "empty Socket.IO packet": "4",
    "unknown Socket.IO type": "49",
    "truncated JSON": f'42{NAMESPACE},["newnumber", {{"a": ',
    "event before connecting": f'42{NAMESPACE},["newnumber", 1]',
    "attachment that never comes": f'451-{NAMESPACE},["x", {{"_placeholder": true, "num": 0}}]',
    "deeply nested JSON": f"42{NAMESPACE}," + "[" * 4000 + "]" * 4000,
    "integer too long to parse": f'40{NAMESPACE},{{"last_id": {"9" * 5000}}}',
    "binary garbage": b"\x00\xff\xfe",
    "pong never asked for": "3",
    "upgrade on an upgraded socket": "5",
    "close before connecting": "1",
}


@pytest.mark.parametrize("packet", MALFORMED_PACKETS.values(), ids=MALFORMED_PACKETS.keys())
def test_malformed_packet_is_shrugged_off(watched_server, raw_clients, packet):
    with shrugged_off(watched_server) as url:
        connection = raw_clients.open(url)
        if isinstance(packet, bytes):
            connection.send_binary(packet)
        else:
            connection.send(packet)
        connection.close()


def test_unknown_namespace_is_refused(watched_server, raw_clients):
    with shrugged_off(watched_server) as url:
        connection = raw_clients.open(url)
        connection.send("40/admin,")
        assert connection.recv().startswith("44/admin,")
        connection.close()


@pytest.mark.parametrize("event", ["newnumber", "hello", "disconnect", "connect"])
def test_events_from_clients_are_ignored(watched_server, raw_clients, event):
    with shrugged_off(watched_server) as url:
        connection = raw_clients.open(url)
        assert join_namespace(connection).startswith(f"40{NAMESPACE},")
        for _ in range(20):
            connection.send(f'42{NAMESPACE},["{event}", {{"number": 1}}]')
        # Still connected, and still fed: the server read and dropped the events.
        wait_until(lambda: connection.recv().startswith(f'42{NAMESPACE},["newnumber"'), message="a broadcast")
        # Counted once, with the watcher ("connect" and "disconnect" would run those handlers again).
        server, _ = watched_server
        wait_until(lambda: server.health()["clients"] == 2, message="two clients")
        connection.close()


@pytest.mark.parametrize("auth", WRONG_RESUME_DATA, ids=repr)
def test_resume_data_of_the_wrong_type_is_ignored(watched_server, raw_clients, auth):
    with shrugged_off(watched_server) as url:
        connection = raw_clients.open(url)
        assert join_namespace(connection, json.dumps(auth)).startswith(f"40{NAMESPACE},")
        wait_until(lambda: connection.recv().startswith(f'42{NAMESPACE},["newnumber"'), message="a broadcast")
        connection.close()


def test_oversized_websocket_message_is_refused(watched_server, raw_clients):
    with shrugged_off(watched_server) as url:
        connection = raw_clients.open(url)
        assert join_namespace(connection).startswith(f"40{NAMESPACE},")
        tcp = connection.sock  # the client lets go of it when the server closes the connection
        connection.send(f'42{NAMESPACE},["hello", "{"x" * 20_000}"]')  # MAX_MESSAGE_SIZE is 10,000
        try:
            while connection.recv():  # broadcasts, until the server's close frame: ""
                pass
        except websocket.WebSocketConnectionClosedException:
            pass  # closed without a close frame: refused all the same
        tcp.close()


@pytest.mark.parametrize(
    "query",
    [
        "EIO=3&transport=polling",
        "EIO=banana&transport=polling",
        "transport=polling",
        "EIO=4&transport=carrier-pigeon",
        "EIO=4&transport=polling&sid=no-such-session",
        "EIO=4&transport=polling&j=not-a-number",
        "EIO=4&transport=websocket",  # without the Upgrade header
        "%ff%fe=%00&EIO=4%00",
    ],
)
def test_bad_handshake_query_is_refused(watched_server, query):
    with shrugged_off(watched_server) as url:
        response = requests.get(f"{url}/socket.io/?{query}", timeout=5)
        assert response.status_code == 400


def test_a_long_polling_handshake_from_another_origin_is_refused(watched_server):
    with shrugged_off(watched_server) as url:
        response = requests.get(url + ENGINEIO_PATH + "polling", headers={"Origin": "http://evil.example"}, timeout=5)
        assert response.status_code == 400


# Origins and headers.


@pytest.mark.parametrize("path", ["/", "/healthz", "/static/app.js", "/no-such-page"])
def test_every_response_has_the_security_headers(client, path):
    with client.get(path) as response:
        assert response.status_code in (200, 404)
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize("kind", SERVERS)
def test_the_server_closes_the_connection_when_its_websocket_ends(live_server, raw_clients, kind):
    # After the closing handshake the server closes the TCP connection (RFC 6455, 7.1.1), so that
    # neither it nor the client waits on it; and nothing the client sends after its close frame is
    # read as an HTTP request (without extras/hardening.py the development server and gevent's do).
    server = start_server(live_server, kind)
    connection = raw_clients.open(server.url)
    assert join_namespace(connection).startswith(f"40{NAMESPACE},")
    # The first client starts the producer, which logs that it started (but not under gunicorn, which
    # has no log setup) before its first broadcast: a line of the producer's, not of the close.
    wait_until(lambda: server.health()["last_id"] > 0, message="the first broadcast")
    log_before = server.log()
    connection.send_close()  # the close frame, without waiting for the reply
    connection.sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    received = b""
    try:
        while chunk := connection.sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass  # closed with the request unread (gunicorn): closed all the same
    except TimeoutError:
        pytest.fail(f"the server kept the connection open {connection.sock.gettimeout()} s after the close")
    assert b"HTTP/1.1" not in received
    wait_until(lambda: server.health()["status"] == "ok")
    assert server.log()[len(log_before):].strip() == ""


# Clients that vanish or stop reading.


def connect_raw_clients(raw_clients, url, count):
    """Connect ``count`` raw clients that answer pings, 50 at a time; return how long it took (seconds)."""
    started = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        list(pool.map(lambda _: raw_clients.join(url, answering=True), range(count)))
    return time.monotonic() - started


def start_watched_server(live_server, listen, ping_interval, ping_timeout):
    """Start a server with short pings and a client that watches its stream; return server, pid, watcher."""
    server = live_server(INTERVAL=0.1, PING_INTERVAL=ping_interval, PING_TIMEOUT=ping_timeout)
    watcher = listen(server.url)
    watcher.wait_for_count(3)
    return server, server.process.pid, watcher


@pytest.mark.timeout(600)  # two rounds of 1000 clients, on a machine that may be very busy
def test_a_thousand_vanished_clients_leave_nothing_behind(live_server, raw_clients):
    # The clients answer pings until they vanish, so that all 1000 are connected at once
    # however long connecting them takes. Broadcasts twice a second: the one thread that
    # answers the pings reads every broadcast to every client too. A short ping interval,
    # which a vanished client's next ping waits out before the server is rid of it, and
    # a ping timeout long enough for a busy server to read the pongs of 1000 clients.
    ping_interval, ping_timeout = 5, 10
    server = live_server(INTERVAL=0.5, PING_INTERVAL=ping_interval, PING_TIMEOUT=ping_timeout)
    pid = server.process.pid
    # The watcher reads Server-Sent Events, which have no pings: a server that lets go of
    # 1000 clients at once on a busy machine can be too busy to ping any client in time
    # (20 s and more), and then drops it, however healthy it is.
    watcher = raw_clients.open_event_stream(server.url)
    wait_until(lambda: server.health()["clients"] == 1, message="the watcher")
    baseline = process_resources(pid)

    seen = {}  # what settled() saw last in this round, for the failure message

    def settled():
        """Only the watcher is left, and the server holds no more threads than before."""
        seen["threads"] = process_resources(pid).threads
        try:
            seen["clients"] = server.health()["clients"]
        except requests.Timeout:
            seen["/healthz timed out"] = seen.get("/healthz timed out", 0) + 1
            return False  # still busy letting go of the clients
        return seen["clients"] == 1 and seen["threads"] <= baseline.threads + 2

    rounds = []
    for _ in range(2):  # the first round also grows the allocator's pools: compare the second with it
        connect_seconds = connect_raw_clients(raw_clients, server.url, 1000)
        clients = server.health()["clients"]
        assert clients == 1001, f"{clients} clients connected, not 1001 (1000 took {connect_seconds:.1f} s)"
        loaded = process_resources(pid)
        seen.clear()
        dropped_at = time.monotonic()
        raw_clients.vanish()
        # A ping cycle at most (each client's next ping waits out its interval), and a
        # very busy machine's margin: thousands of threads end at once, and while they do the
        # server has been seen not to answer /healthz for 45 s (load average 350 on 2 cores).
        wait_until(
            settled,
            timeout=ping_interval + ping_timeout + 4 * DEADLINE,
            message=lambda: (
                f"the server to let go of 1000 clients: 1 client and at most {baseline.threads + 2} threads "
                f"expected; last seen {seen}"
            ),
        )
        settled_after = time.monotonic() - dropped_at
        time.sleep(ping_timeout)  # Engine.IO sweeps closed sessions out once per ping timeout
        rounds.append((loaded, connect_seconds, settled_after, process_resources(pid)))

    logger.info(
        "1000 vanished clients: baseline %s; (loaded, seconds to connect, seconds to settle, swept) %s",
        baseline,
        rounds,
    )
    # A leak would keep most of what 1000 connections take (about 60 MiB); the allocator's
    # noise between two rounds was 5 to 17 MiB. Half the load is the line between. (The
    # soak test below finds a leak of 1 kB per connection.)
    load_mib = rounds[0][0].rss_mib - baseline.rss_mib
    growth_mib = rounds[1][3].rss_mib - rounds[0][3].rss_mib
    assert growth_mib < load_mib / 2, (
        f"RSS grew {growth_mib:.1f} MiB from the first round to the second; half of what 1000 clients "
        f"take ({load_mib:.1f} MiB) is the most allowed: {rounds}"
    )
    # The watcher was sent the stream all along, and it still flows.
    ids = read_ids(watcher, server.health()["last_id"] + 3)
    assert ids[0] == 1, ids
    assert_consecutive(ids)


@pytest.mark.soak
@pytest.mark.timeout(900)  # about 90 s on a quiet machine
def test_ten_thousand_connect_disconnect_cycles_do_not_grow(live_server, listen, raw_clients):
    ping_interval, ping_timeout = 5, 5
    server, pid, watcher = start_watched_server(live_server, listen, ping_interval, ping_timeout)
    baseline_threads = process_resources(pid).threads

    def cycles(count):
        """Connect and drop ``count`` raw clients, 20 at a time; wait until the server let go of them."""

        def cycle(_):
            drop_without_close(raw_clients.join(server.url))

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(cycle, range(count)))
        wait_until(
            lambda: server.health()["clients"] == 1 and process_resources(pid).threads <= baseline_threads + 2,
            timeout=ping_interval + ping_timeout + 20,  # a ping cycle, and a busy machine's margin
            message="the server to let go of the cycles' clients",
        )
        time.sleep(ping_timeout)  # Engine.IO sweeps closed sessions out once per ping timeout

    # Python keeps freed memory for reuse, so memory first grows to a plateau; a leak would
    # keep growing. Five batches of 2000: the last three must stay within 1 kB per cycle.
    rss = []
    started = time.monotonic()
    for _ in range(5):
        cycles(2000)
        rss.append(process_resources(pid).rss_mib)
    logger.info("10,000 cycles in %.1f s; RSS (MiB) after each 2000: %s", time.monotonic() - started, rss)
    assert rss[-1] - rss[-3] < 4000 * 1024 / 2**20, f"RSS (MiB) after each 2000 cycles: {rss}"
    assert_stream_flows(watcher)


def test_a_client_that_stops_reading_is_dropped_and_slows_nobody(
    live_server, listen, raw_clients, scheduling_delay
):
    interval = 0.1
    command = ["python", "tests/serve_with_source.py", "sources:large", "--port", "{port}"]
    server = live_server(command=command, INTERVAL=interval, PING_INTERVAL=1, PING_TIMEOUT=2)
    watcher = listen(server.url)
    watcher.wait_for_count(5)
    baseline = process_resources(server.process.pid)

    # A small receive buffer, and never a read: the server's buffers for it fill up.
    stalled = raw_clients.open(server.url, sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    assert join_namespace(stalled).startswith(f"40{NAMESPACE},")
    stalled_at = len(watcher.ids())
    peak_rss = baseline.rss_mib
    deadline = time.monotonic() + DEADLINE
    while server.health()["clients"] == 2:
        assert time.monotonic() < deadline, f"the stalled client was not dropped within {DEADLINE} s"
        peak_rss = max(peak_rss, process_resources(server.process.pid).rss_mib)
        time.sleep(0.1)
    assert_stream_flows(watcher, count=10)

    # Every broadcast reached the watcher on time while the other client stalled: no
    # wait for the stalled client's full buffers, beyond the delays this machine has
    # shown (a thread of this process woke up to ``noise`` seconds late meanwhile).
    arrivals = watcher.arrival_times[stalled_at:]
    gaps = sorted(later - earlier for earlier, later in zip(arrivals, arrivals[1:]))
    noise = scheduling_delay.worst()
    median_gap, longest_gap = gaps[len(gaps) // 2], gaps[-1]
    assert median_gap < interval + 0.02 + noise, (
        f"median gap {median_gap:.3f} s between broadcasts at the watcher; expected under "
        f"{interval} s + 0.02 s + {noise:.3f} s of scheduling delay measured meanwhile: {gaps}"
    )
    assert longest_gap < interval + 0.5 + noise, (
        f"longest gap {longest_gap:.3f} s between broadcasts at the watcher; expected under "
        f"{interval} s + 0.5 s + {noise:.3f} s of scheduling delay measured meanwhile: {gaps}"
    )
    assert peak_rss - baseline.rss_mib < 30, f"peak RSS {peak_rss:.1f} MiB, baseline {baseline}"
    logger.info("stalled client: baseline %s, peak RSS %.1f MiB, delay %.3f s", baseline, peak_rss, noise)

    # Its last write to the full socket blocks until the client goes (or a proxy's send
    # timeout cuts it off); then the server holds nothing more for it.
    drop_without_close(stalled)
    wait_until(
        lambda: process_resources(server.process.pid).threads <= baseline.threads + 1,
        message="the stalled client's threads to end",
    )


# A number source that fails, hangs or is slow.


def serve_with_source(live_server, source, **settings):
    """Start the real server with ``sources.<source>`` as next_number()."""
    command = ["python", "tests/serve_with_source.py", f"sources:{source}", "--port", "{port}"]
    return live_server(command=command, **settings)


def test_a_failing_source_is_reported_once(live_server, listen):
    server = serve_with_source(live_server, "raising", INTERVAL=0.05)
    listen(server.url)
    health = wait_until(lambda: server.health()["status"] == "degraded" and server.health(), message="degraded")
    assert "ConnectionError('database unavailable')" in health["problem"]
    assert health["producer_running"] and health["last_broadcast_time"] is None
    time.sleep(0.5)  # ten more failing ticks
    assert server.log().count("next_number() failed") == 1


def test_a_hanging_source_skips_ticks_then_recovers(live_server, listen):
    # An interval long enough that on a busy machine only the hang makes a call late,
    # and short enough that the 2 s hang skips several ticks.
    interval = 0.25
    server = serve_with_source(live_server, "hanging", INTERVAL=interval)  # the fifth call takes 2 s
    listener = listen(server.url)
    health = wait_until(lambda: server.health()["status"] == "degraded" and server.health(), message="degraded")
    assert "has not returned" in health["problem"]
    wait_until(lambda: time.time() - server.health()["last_broadcast_time"] > 1, message="no broadcast for 1 s")

    wait_until(lambda: server.health()["status"] == "ok", message="recovery")
    assert_stream_flows(listener, count=5)
    log = server.log()
    assert log.count("has not returned") == 1
    assert log.count("next_number() works again") == 1
    # The late value went out once, then the schedule carried on: no burst to catch up. A
    # broadcast may follow a late one closely (the schedule catches up, or starts again
    # from it), but a burst puts three or more within half an interval.
    times = [message["time"] for message in listener.messages]
    spans = [times[i + 2] - times[i] for i in range(len(times) - 2)]
    assert min(spans) > interval / 2, (
        f"three broadcasts within {min(spans):.3f} s; expected any three to span over {interval / 2} s: "
        f"{times}"
    )


def test_a_slow_source_slows_the_stream_without_bursts(live_server, listen):
    interval = 0.1
    server = serve_with_source(live_server, "slow", INTERVAL=interval)  # 0.15 s per value
    listener = listen(server.url)
    messages = listener.wait_for_count(6)
    listener.disconnect()
    assert_consecutive([message["id"] for message in messages])
    # One call at a time, each 0.15 s: however busy the machine, never two values within one interval.
    gaps = [later["time"] - earlier["time"] for earlier, later in zip(messages, messages[1:])]
    assert min(gaps) > interval, f"broadcasts {min(gaps):.3f} s apart; expected over {interval} s: {gaps}"
    assert server.health()["status"] == "degraded"
    assert server.log().count("has not returned") == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stops_promptly_while_the_source_hangs(live_server, listen, sig):
    started = time.monotonic()
    server = serve_with_source(live_server, "hanging_forever", INTERVAL=0.05)  # three values, then nothing
    start_seconds = time.monotonic() - started
    listener = listen(server.url)
    listener.wait_for_count(3)
    wait_until(lambda: server.health()["status"] == "degraded", message="degraded")
    assert_stops_promptly(server, sig, start_seconds)
    wait_until(lambda: not listener.client.connected, message="the client to notice")
