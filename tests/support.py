"""Helpers shared by the tests: polling, a real Socket.IO client that records what it hears,
raw protocol clients that can misbehave, and the server process's resources."""
import bisect
import socket
import struct
import threading
import time
from dataclasses import dataclass

import socketio
import websocket

from protocol import EVENT, NAMESPACE


def wait_until(condition, timeout=10.0, interval=0.02, message="condition"):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
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
        self.client.disconnect()

    def ids(self):
        with self.lock:
            return [message["id"] for message in self.messages]

    def wait_for_count(self, count, timeout=10.0):
        """Wait until at least ``count`` messages arrived; return them."""
        wait_until(lambda: len(self.messages) >= count, timeout, message=f"{count} messages")
        with self.lock:
            return list(self.messages)


def disconnect_all(listeners):
    """Disconnect many clients at once (a client may wait up to 3 s for the server's close frame)."""
    threads = [threading.Thread(target=listener.disconnect) for listener in listeners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def assert_consecutive(ids):
    """Each id is one more than the one before: no gap, no duplicate, no reordering."""
    assert ids == list(range(ids[0], ids[0] + len(ids))), ids


def assert_stream_flows(listener, count=3, timeout=10.0):
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
