"""Server-Sent Events (/stream) and the streamed page (/plain): handler tests, then the real servers."""
import http.client
import json
import re
import resource
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from application import create_app
from extras import streaming
from extras.streaming import requested_last_id
from live import SERVERS, live_server, start_server  # noqa: F401  (a fixture)
from protocol import EVENT, VALUE
from support import (  # noqa: F401  (listen_fixture, scheduling_delay_fixture: the fixtures)
    DEADLINE,
    assert_consecutive,
    listen_fixture,
    scheduling_delay_fixture,
    wait_until,
)


class EventSource:
    """A client of an event stream over a real HTTP/1.1 connection, parsed as the SSE specification says."""

    def __init__(self, url, path="/stream", headers=None):
        address = urlsplit(url)
        self.connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
        try:
            self.connection.request("GET", path, headers={"Accept": "text/event-stream", **(headers or {})})
            self.socket = self.connection.sock  # the response takes it over when the server will close
            self.response = self.connection.getresponse()
        except BaseException:
            self.connection.close()
            raise
        self.socket.settimeout(None)  # a stream is silent for as long as it likes
        self.events = []  # dicts with "id", "event", "data", "message" (parsed) and "received" (monotonic)
        self.comments = []
        self.retry = None
        self.raw = b""
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        pending = ""
        event = {}
        try:
            while chunk := self.response.read1(65536):
                self.raw += chunk
                pending += chunk.decode("utf-8")
                *lines, pending = re.split(r"\r\n|\r|\n", pending)
                for line in lines:
                    event = self._field(line, event)
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed by the test or the server

    def _field(self, line, event):
        """Take one line of the stream; return the event being built."""
        if line == "":
            if "data" in event:
                received = time.monotonic()
                with self.lock:
                    self.events.append({**event, "received": received, "message": json.loads(event["data"])})
            return {"id": event.get("id")}
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return event
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            event["data"] = event["data"] + "\n" + value if "data" in event else value
        elif name in ("id", "event"):
            event[name] = value
        elif name == "retry":
            self.retry = int(value)
        return event

    def messages(self):
        with self.lock:
            return [event["message"] for event in self.events]

    def ids(self):
        return [message["id"] for message in self.messages()]

    def wait_for_count(self, count, timeout=10.0):
        wait_until(lambda: len(self.events) >= count, timeout, message=f"{count} events")
        return self.messages()

    def close(self):
        """Hang up at once, as a browser tab that closes; closing again does nothing."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.reader.join(DEADLINE)  # it sees the end of the stream, then the connection can close
        self.response.close()
        self.socket.close()


@pytest.fixture
def open_stream():
    """Open EventSources (called as ``EventSource(...)`` is); close them all after the test."""
    streams = []

    def open_stream(url, path="/stream", headers=None):
        stream = EventSource(url, path, headers)
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.close()


# Handler-level tests: Flask's test client, no network.


def read_chunks(response, count):
    chunks = iter(response.response)
    return [next(chunks) for _ in range(count)]


def test_stream_sends_headers_hint_and_history(client, feed):
    for number in (1.5, 2.5, 3.5):
        feed.publish(number)
    response = client.get("/stream?last_id=1", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in response.headers
    retry, second, third = read_chunks(response, 3)
    assert retry == b"retry: 2000\n\n"
    message = json.loads(second.decode().split("data: ")[1])
    assert second.decode() == f"id: 2\nevent: newnumber\ndata: {json.dumps(message)}\n\n"
    assert message == feed.history[1]
    assert third.startswith(b"id: 3\n")
    assert feed.listeners == 1
    response.close()
    assert feed.listeners == 0


def test_stream_sends_each_broadcast_to_every_subscriber(client, feed):
    first, second = client.get("/stream"), client.get("/stream")
    read_chunks(first, 1), read_chunks(second, 1)  # subscribed from here on
    feed.publish(4.5)
    assert read_chunks(first, 1)[0].startswith(b"id: 1\n")
    assert read_chunks(second, 1)[0].startswith(b"id: 1\n")
    first.close(), second.close()
    assert feed.listeners == 0 and not client.application.extensions["streaming_subscribers"]


def test_a_full_queue_drops_the_subscriber_and_spares_the_rest(client, feed, caplog):
    slow, fast = client.get("/stream"), client.get("/stream")
    read_chunks(slow, 1), read_chunks(fast, 1)
    for number in range(streaming.QUEUE_SIZE + 1):
        feed.publish(number)
        read_chunks(fast, 1)
    assert feed.listeners == 1
    assert caplog.text.count("Dropped a streaming client") == 1
    slow.close(), fast.close()
    assert feed.listeners == 0


@pytest.mark.parametrize(
    "data, framed",
    [
        ("one line", "data: one line\n"),
        ("line one\nline two", "data: line one\ndata: line two\n"),
        ("a\r\nb\rc", "data: a\ndata: b\ndata: c\n"),
        ("", "data: \n"),
        ("π ≈ 3.142 ✓\u2028same line", "data: π ≈ 3.142 ✓\u2028same line\n"),
    ],
    ids=["one-line", "lf", "crlf-and-cr", "empty", "non-ascii"],
)
def test_frame_event_follows_the_line_rules(data, framed):
    assert streaming.frame_event(data) == framed + "\n"
    assert streaming.frame_event(data, event="e", event_id=7) == "id: 7\nevent: e\n" + framed + "\n"


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "²", "9" * 40, " 4"])
def test_an_invalid_last_id_is_ignored(app, value, caplog):
    with app.test_request_context(headers={"Last-Event-ID": value}):
        assert requested_last_id() is None
    assert "Ignored a last id" in caplog.text


def test_last_event_id_wins_over_the_query_parameter(app):
    with app.test_request_context("/stream?last_id=3", headers={"Last-Event-ID": "8"}):
        assert requested_last_id() == 8
    with app.test_request_context("/stream?last_id=3"):
        assert requested_last_id() == 3


@pytest.mark.parametrize(
    "setting, origin, status, allow_origin",
    [
        ("", "http://evil.example", 403, None),
        ("", "http://localhost", 200, None),  # the test client's own origin
        ("https://app.example, https://other.example", "https://other.example", 200, "https://other.example"),
        ("https://app.example", "http://evil.example", 403, None),
        ("*", "http://any.example", 200, "http://any.example"),
    ],
)
def test_stream_origins(setting, origin, status, allow_origin, caplog):
    app = create_app({"TESTING": True, "SECRET_KEY": "test", "INTERVAL": 3600.0, "ALLOWED_ORIGINS": setting})
    response = app.test_client().get("/stream", headers={"Origin": origin})
    assert response.status_code == status
    assert response.headers.get("Access-Control-Allow-Origin") == allow_origin
    assert ("Refused /stream" in caplog.text) == (status == 403)
    response.close()
    app.extensions["feed"].stop()


# The real servers, with real HTTP clients.


@pytest.mark.parametrize("kind", SERVERS)
def test_same_ids_and_payloads_as_socketio_and_resume_without_gap(live_server, listen, open_stream, kind):
    server = start_server(live_server, kind, INTERVAL=0.05, HISTORY_SIZE=1000)
    listener = listen(server.url)
    stream = open_stream(server.url)
    try:
        stream.wait_for_count(5)
        assert stream.retry == 2000
        first_id = stream.ids()[0]
        wait_until(lambda: first_id + 4 in listener.ids(), message="the same broadcasts over Socket.IO")
        by_id = {message["id"]: message for message in listener.messages}
        for event, message in zip(stream.events, stream.messages()):
            assert event["event"] == EVENT
            assert event["id"] == str(message["id"])
            if message["id"] in by_id:
                assert message == by_id[message["id"]]
    finally:
        stream.close()
        listener.disconnect()
    assert_consecutive(stream.ids())

    last_seen = stream.ids()[-1]
    wait_until(lambda: server.health()["last_id"] >= last_seen + 4, message="four more broadcasts")
    resumed = open_stream(server.url, headers={"Last-Event-ID": str(last_seen)})
    query = open_stream(server.url, path=f"/stream?last_id={last_seen}")
    try:
        for client in (resumed, query):
            ids = [message["id"] for message in client.wait_for_count(6)]
            assert ids[0] == last_seen + 1
            assert_consecutive(ids)
    finally:
        resumed.close()
        query.close()


@pytest.mark.parametrize("kind", SERVERS)
def test_disconnected_subscribers_are_freed_at_once(live_server, open_stream, scheduling_delay, kind):
    # No broadcast and no heartbeat for a minute: nothing is written that could fail and
    # show the server that a client has gone. Only its look at each idle client's
    # connection, every CHECK_INTERVAL seconds, can free them before that.
    server = start_server(live_server, kind, INTERVAL=60, HEARTBEAT=60)
    streams = [open_stream(server.url) for _ in range(5)]
    wait_until(lambda: server.health()["clients"] == 5, message="five subscribers")
    for stream in streams:
        stream.close()
    closed = time.monotonic()
    wait_until(lambda: server.health()["clients"] == 0, message="the count back to zero")
    freed_in, noise = time.monotonic() - closed, scheduling_delay.worst()
    expected = 4 * streaming.CHECK_INTERVAL + noise
    assert freed_in < expected, (
        f"freed {freed_in:.2f} s after they closed; expected under {expected:.2f} s: four looks at "
        f"{streaming.CHECK_INTERVAL} s, and the {noise:.3f} s of scheduling delay measured meanwhile"
    )
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("async_mode", ["threading", "gevent"])
def test_a_slow_reader_is_dropped_while_others_keep_their_timing(
    live_server, listen, open_stream, scheduling_delay, async_mode
):
    # Large broadcasts: the kernel's buffers on both ends of the slow connection
    # (megabytes on loopback) fill in a few of them, and then its queue fills. Ten a
    # second: a reader that falls QUEUE_SIZE (60) broadcasts behind is dropped too, and on
    # a busy machine this process can be seconds late reading 64 kB broadcasts.
    interval = 0.1
    command = ["python", "tests/serve_with_source.py", "sources:large", "--port", "{port}"]
    server = live_server(command=command, ASYNC_MODE=async_mode, INTERVAL=interval)
    listener = listen(server.url)
    stream = open_stream(server.url)
    slow = socket.socket()
    try:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a small window, soon full
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        wait_until(lambda: server.health()["clients"] == 3, message="three listeners")
        # Some 12 s on a quiet machine: megabytes of buffers, then 60 broadcasts.
        wait_until(
            lambda: "Dropped a streaming client" in server.log(), timeout=3 * DEADLINE, message="the drop"
        )
        assert server.health()["clients"] == 2
        dropped_at = server.health()["last_id"]
        later = dropped_at + 20
        wait_until(lambda: later in stream.ids() and later in listener.ids(), message="20 more broadcasts")
    finally:
        slow.close()
        stream.close()
        listener.disconnect()
    assert server.log().count("Dropped a streaming client") == 1
    assert "Traceback" not in server.log()
    assert_consecutive(stream.ids())
    assert_consecutive(listener.ids())
    # The producer never waited for the slow reader, and the fast reader got each broadcast
    # on time: no stall beyond the delays this machine has shown meanwhile (a thread of
    # this process woke up to ``noise`` seconds late). Waiting for the slow reader's full
    # buffers would stall them until it was dropped.
    noise = scheduling_delay.worst()
    messages = stream.messages()
    times = [message["time"] for message in messages]
    longest_gap = max(later - earlier for earlier, later in zip(times, times[1:]))
    assert longest_gap < interval + 0.5 + noise, (
        f"{longest_gap:.3f} s between two broadcasts; expected under {interval} s + 0.5 s + {noise:.3f} s "
        f"of scheduling delay measured meanwhile: {times}"
    )
    # Arrival minus broadcast time: the two clocks differ by a constant; delays would add to it.
    # A server starved of CPU by a busy machine delivers 3 MB/s late to every client, and
    # the sleeping probe does not see that; the Socket.IO client, whose path shares no
    # writer with the streams, shows how late: the stream may spread as much, not more.
    common = set(stream.ids()) & set(listener.ids())
    delays = [
        event["received"] - message["time"]
        for event, message in zip(stream.events, messages)
        if message["id"] in common
    ]
    control = [
        arrived - message["time"]
        for arrived, message in zip(listener.arrival_times, listener.messages)
        if message["id"] in common
    ]
    spread, control_spread = max(delays) - min(delays), max(control) - min(control)
    expected = 0.5 + noise + control_spread
    assert spread < expected, (
        f"delays from broadcast to arrival at the stream spread over {spread:.3f} s; expected under "
        f"{expected:.3f} s: 0.5 s, {noise:.3f} s of scheduling delay and the {control_spread:.3f} s "
        f"spread of the Socket.IO client's delays, measured meanwhile: {delays}"
    )


def test_heartbeat_comments_keep_a_quiet_stream_alive(live_server, open_stream):
    server = live_server(INTERVAL=60, HEARTBEAT=0.2)
    stream = open_stream(server.url)
    try:
        wait_until(lambda: stream.comments.count("keep-alive") >= 3, message="three heartbeats")
    finally:
        stream.close()
    assert stream.events == []


@pytest.mark.parametrize(
    "source, expected", [("multiline", "line one\nline two"), ("unicode", "π ≈ 3.142 ✓")]
)
def test_multiline_and_non_ascii_data_arrive_intact(live_server, open_stream, source, expected):
    command = ["python", "tests/serve_with_source.py", f"sources:{source}", "--port", "{port}"]
    server = live_server(command=command, INTERVAL=0.05)
    stream = open_stream(server.url)
    try:
        messages = stream.wait_for_count(2)
    finally:
        stream.close()
    assert len(stream.events) == len(messages)  # a line break in the value made no extra event
    assert all(message[VALUE] == expected for message in messages)
    if source == "unicode":
        assert expected.encode("utf-8") in stream.raw  # sent as UTF-8, as the content type says


def test_cross_origin_stream_is_refused_by_the_real_server(live_server, open_stream):
    server = live_server(ALLOWED_ORIGINS="https://app.example")
    refused = requests.get(server.url + "/stream", headers={"Origin": "http://evil.example"}, timeout=5)
    assert refused.status_code == 403
    assert "Refused /stream to origin 'http://evil.example'" in server.log()
    allowed = open_stream(server.url, headers={"Origin": "https://app.example"})
    try:
        assert allowed.response.status == 200
        assert allowed.response.getheader("Access-Control-Allow-Origin") == "https://app.example"
    finally:
        allowed.close()


def test_plain_page_streams_escaped_values_then_ends(live_server, open_stream, scheduling_delay):
    command = ["python", "tests/serve_with_source.py", "sources:markup", "--port", "{port}"]
    seconds = 1.5
    server = live_server(command=command, INTERVAL=0.1, PLAIN_PAGE_SECONDS=seconds)
    early = open_stream(server.url)  # starts the feed, so that /plain has some history
    wait_until(lambda: server.health()["last_id"] >= 3, message="three broadcasts")
    started = time.monotonic()
    arrivals = []
    with requests.get(server.url + "/plain", stream=True, timeout=DEADLINE) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        for chunk in response.iter_content(chunk_size=None):
            arrivals.append((time.monotonic() - started, chunk))
    early.close()
    page = b"".join(chunk for _, chunk in arrivals).decode()
    assert "<script" not in page
    assert '<img src="x"' not in page
    assert page.count("&lt;img src=&#34;x&#34; onerror=&#34;window.injected = true&#34;&gt;") >= 10
    ids = [int(value) for value in re.findall(r'<li value="(\d+)">', page)]
    assert ids[0] <= 3  # the history came first
    assert_consecutive(ids)
    assert 'href="/plain">Reload it</a>' in page
    # It ends after PLAIN_PAGE_SECONDS, allowing for the delays this machine has shown meanwhile.
    ended, noise = arrivals[-1][0], scheduling_delay.worst()
    assert seconds - 0.1 < ended < seconds + 3.5 + noise, (
        f"the page ended after {ended:.2f} s; expected {seconds} s, and under {seconds + 3.5 + noise:.2f} s "
        f"with the {noise:.3f} s of scheduling delay measured meanwhile"
    )
    # Items arrived while the page was still loading, not all at its end.
    second = arrivals[1][0]
    assert second < ended - seconds / 2, f"the second chunk came after {second:.2f} s, the last {ended:.2f} s"
    wait_until(lambda: server.health()["clients"] == 0, message="/plain to let go")


def test_a_hang_up_is_noticed_on_a_descriptor_above_1023():
    """select() refuses descriptors of 1024 and above: a busy threaded server hands those out."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the open-files limit is {hard}: 1200 are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers = [socket.socket() for _ in range(1100)]
    server_end, client_end = socket.socketpair()
    try:
        assert server_end.fileno() >= 1024
        subscriber = streaming.Subscriber({"werkzeug.socket": server_end})
        assert not subscriber.client_left()
        client_end.close()
        assert subscriber.client_left()
    finally:
        for sock in fillers + [server_end, client_end]:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
