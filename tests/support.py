"""Helpers shared by the tests: polling, and a real Socket.IO client that records what it hears."""
import threading
import time

import socketio

NAMESPACE = "/test"
EVENT = "newnumber"


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
    """A python-socketio client over a real WebSocket that keeps every message it receives."""

    def __init__(self, url, auth=None, origin=None):
        self.url = url
        self.auth = auth
        self.messages = []
        self.lock = threading.Lock()
        # The WebSocket client sends the server's own address as Origin unless told otherwise.
        extra = {"origin": origin} if origin else {}
        self.client = socketio.Client(reconnection=False, websocket_extra_options=extra)
        self.client.on(EVENT, self._received, namespace=NAMESPACE)

    def _received(self, message):
        with self.lock:
            self.messages.append(message)

    def connect(self, wait_timeout=10):
        self.client.connect(
            self.url,
            namespaces=[NAMESPACE],
            transports=["websocket"],
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
