"""Helpers shared by the tests: polling, a real Socket.IO client that records what it hears,
raw protocol clients that can misbehave, and the server process's resources."""
import bisect
import socket
import struct
import threading
import time
from dataclasses import dataclass

import pytest
import socketio
import websocket

from protocol import EVENT, NAMESPACE


# How long a test waits for something before it fails: generous enough for a busy 2-core
# machine (CI may share one with other work). A poll ends as soon as its condition holds,
# so only a test that fails waits this long.
DEADLINE = 30.0


def wait_until(condition, timeout=DEADLINE, interval=0.02, message="condition"):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds.

    ``message`` says what was awaited; it may be a function, to describe what was seen last.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            awaited = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s waiting for {awaited}")
        time.sleep(interval)


class Listener:
    """A python-socketio client (over a WebSocket unless told otherwise) that keeps every message it hears.

    ``transports=None`` is the client's default: long-polling, then an upgrade to WebSocket.
    ``http_session`` is the requests.Session that long-polling goes through.
    """

    def __init__(self, url, auth=None, origin=None, transports=("websocket",), http_session=None):
        self.url = url
        self.auth = auth
        self.transports = None if transports is None else list(transports)
        self.messages = []
        self.arrival_times = []  # time.monotonic() at each message
        self.lock = threading.Lock()
        # The WebSocket client sends the server's own address as Origin unless told otherwise.
        extra = {"origin": origin} if origin else {}
        self.client = socketio.Client(
            reconnection=False, websocket_extra_options=extra, http_session=http_session
        )
        self.client.on(EVENT, self._received, namespace=NAMESPACE)

    def _received(self, message):
        # The client runs each handler in a thread of its own, so two messages that
        # arrive close together can get here in either order: keep them in id order.
        # (The order the server sends in is checked with ordered clients: the
        # Flask-SocketIO test client, the browser and the raw protocol clients.)
        with self.lock:
            index = bisect.bisect_right(self.messages, message["id"], key=lambda kept: kept["id"])
            self.messages.insert(index, message)
            self.arrival_times.insert(index, time.monotonic())

    def connect(self, wait_timeout=10):
        self.client.connect(
            self.url,
            namespaces=[NAMESPACE],
            transports=self.transports,
            auth=self.auth,
            wait_timeout=wait_timeout,
        )
        return self

    def disconnect(self):
        if self.client.connected:
            self.client.disconnect()
        # python-engineio 4.15.1's client leaves its WebSocket open when it gives up on its
        # own ("packet queue is empty, aborting", after a server too busy to ping in time):
        # close it here, or its socket is left to the garbage collector's ResourceWarning.
        if self.client.eio.ws is not None:
            self.client.eio.ws.shutdown()

    def ids(self):
        with self.lock:
            return [message["id"] for message in self.messages]

    def wait_for_count(self, count, timeout=DEADLINE):
        """Wait until at least ``count`` messages arrived; return them."""
        wait_until(lambda: len(self.messages) >= count, timeout, message=f"{count} messages")
        with self.lock:
            return list(self.messages)


def disconnect_all(listeners):
    """Disconnect many clients at once."""
    threads = [threading.Thread(target=listener.disconnect) for listener in listeners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.fixture(name="listen")
def listen_fixture():
    """Connect Listeners (called as ``Listener(...).connect()`` is); disconnect them all after the test.

    Import it into a test module as ``listen_fixture``; tests ask for it as ``listen``.
    """
    listeners = []

    def listen(url, auth=None, origin=None, wait_timeout=10):
        listener = Listener(url, auth=auth, origin=origin)
        listeners.append(listener)
        return listener.connect(wait_timeout)

    yield listen
    disconnect_all(listeners)


class SchedulingDelay:
    """A thread that sleeps in short steps and notes how late it wakes each time.

    It measures the machine's own scheduling delay while a test runs, so that a timing
    check can allow for the noise it saw rather than assume a quiet machine.
    """

    def __init__(self, step=0.01):
        self.step = step
        self.delays = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._measure, daemon=True)

    def _measure(self):
        while True:
            before = time.monotonic()
            if self._stopping.wait(self.step):
                return
            self.delays.append(time.monotonic() - before - self.step)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._thread.join()

    def worst(self):
        """The longest a thread of this process has waited for the CPU (seconds) so far."""
        return max(self.delays, default=0.0)


@pytest.fixture(name="scheduling_delay")
def scheduling_delay_fixture():
    """A ``SchedulingDelay`` measuring from the start of the test to its end."""
    probe = SchedulingDelay().start()
    yield probe
    probe.stop()


def assert_stops_promptly(server, sig, start_seconds):
    """Stop ``server`` with ``sig``: it exits with 0 in less time than it took to start, or 2 s.

    Starting (imports, a first request) is more work than stopping, and a busy machine
    slows both; a server that waits for something before it exits takes longer than either.
    """
    expected = max(2.0, start_seconds)
    started = time.monotonic()
    assert server.stop(sig, timeout=DEADLINE) == 0
    stopped_in = time.monotonic() - started
    assert stopped_in < expected, (
        f"stopped in {stopped_in:.2f} s after {sig!r}; expected under {expected:.2f} s "
        f"(it started in {start_seconds:.2f} s)"
    )


def assert_consecutive(ids):
    """Each id is one more than the one before: no gap, no duplicate, no reordering."""
    assert ids == list(range(ids[0], ids[0] + len(ids))), ids


def assert_stream_flows(listener, count=3, timeout=DEADLINE):
    """Wait until ``listener`` has ``count`` more broadcasts; all it has are consecutive."""
    wait_for = len(listener.ids()) + count
    listener.wait_for_count(wait_for, timeout)
    assert_consecutive(listener.ids())


# Raw clients that speak Engine.IO v4 and Socket.IO v5 by hand, so that tests can send
# what no well-behaved client would: "0{...}" open, "40/test,{auth}" connect, "42/test,[...]" event.
ENGINEIO_PATH = "/socket.io/?EIO=4&transport="


def open_websocket(server_url, origin=None, **options):
    """Open a raw Engine.IO WebSocket and read the server's open packet."""
    url = server_url.replace("http://", "ws://", 1) + ENGINEIO_PATH + "websocket"
    connection = websocket.create_connection(url, origin=origin or server_url, timeout=10, **options)
    opening = connection.recv()
    assert opening.startswith("0{"), opening
    return connection


def join_namespace(connection, auth_json=""):
    """Ask to connect to the namespace, with ``auth_json`` as the Socket.IO auth data; return the answer.

    The answer is "40/test,{sid}" (connected) or "44/test,{message}" (refused); the
    history the server sends on connect may come before it and is skipped.
    """
    connection.send(f"40{NAMESPACE},{auth_json}")
    while True:
        packet = connection.recv()
        if packet.startswith((f"40{NAMESPACE},", f"44{NAMESPACE},")):
            return packet


def drop_without_close(connection):
    """Reset the TCP connection, with no WebSocket close frame: the client's network vanished."""
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.sock.close()


@dataclass
class Resources:
    """What a process holds: its threads (or OS threads under gevent) and resident memory."""

    threads: int
    rss_mib: float


def process_resources(pid):
    """Read a process's thread count and resident memory from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return Resources(int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024)
