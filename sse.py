"""Server-Sent Events over plain WSGI: framing, and one bounded queue per streaming client.

A WSGI response is a generator that the server iterates in the client's own
thread or greenlet. Two things make that hard to get right, and this module
does them once for every streamed response of the app:

- A client that stops reading must not stall anyone else. Each client has its
  own bounded queue; the producer only ever puts to it without waiting, and a
  client whose queue is full is dropped (its connection shut down, which also
  frees a write that is stuck on it).
- A client that goes away must be let go at once, not at the next write. While
  it waits for the next message, the generator looks at the client's socket
  every ``CHECK_INTERVAL`` seconds for the end of the connection.
"""
import queue
import re
import select
import socket
import time

QUEUE_SIZE = 60  # broadcasts a client may fall behind before it is dropped
CHECK_INTERVAL = 0.25  # seconds between looks at an idle client's connection
RECONNECT_DELAY = 2000  # milliseconds a browser waits before it reconnects
KEEP_ALIVE = ": keep-alive\n\n"  # a comment: browsers ignore it, proxies see traffic
STREAMING_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers responses by default: this turns it off for this response.
    "X-Accel-Buffering": "no",
}
CONTENT_TYPE = "text/event-stream; charset=utf-8"

# The SSE specification ends a line at CR LF, LF or CR; nothing else (str.splitlines
# would also split at form feeds, U+2028 and others, and change the data).
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def frame_event(data, event=None, event_id=None):
    """Return one event as the text of an event stream; each line of ``data`` becomes a ``data:`` line."""
    fields = []
    if event_id is not None:
        fields.append(f"id: {event_id}")
    if event is not None:
        fields.append(f"event: {event}")
    fields.extend(f"data: {line}" for line in LINE_BREAK.split(data))
    return "\n".join(fields) + "\n\n"


def retry_hint(milliseconds=RECONNECT_DELAY):
    """Return the field that tells the browser how long to wait before it reconnects."""
    return f"retry: {milliseconds}\n\n"


def client_socket(environ):
    """Return the client's socket from the WSGI environ, or None if this server does not expose it."""
    for key in ("werkzeug.socket", "gunicorn.socket"):
        if key in environ:
            return environ[key]
    if environ.get("SERVER_SOFTWARE", "").startswith("gevent"):
        # gevent's server does not put the socket in the environ; it is behind
        # the request body's file, as simple-websocket (a dependency) also finds it.
        body = getattr(environ["wsgi.input"], "rfile", environ["wsgi.input"])
        gevent_socket = getattr(getattr(body, "raw", None), "_sock", None)
        # Take the operating system's socket under gevent's: shutting that one down
        # fails a write waiting on it with EPIPE, which gevent's server ignores;
        # gevent's own shutdown() fails it with EBADF, which it logs with a traceback.
        return getattr(gevent_socket, "_sock", None)
    return None


class Subscriber:
    """One streaming client: the messages waiting for it, and its connection."""

    def __init__(self, environ, queue_size=QUEUE_SIZE):
        self.queue = queue.Queue(maxsize=queue_size)
        self.socket = client_socket(environ)
        self.dropped = False

    def offer(self, message):
        """Queue a message without waiting; return False if the queue is full (the client is too slow)."""
        try:
            self.queue.put_nowait(message)
        except queue.Full:
            return False
        return True

    def drop(self):
        """End this client's stream: shut its connection, which also ends a write stuck on it."""
        self.dropped = True
        if self.socket is not None:
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def client_left(self):
        """Return True if the client has closed its end of the connection."""
        if self.socket is None:
            return False  # the next write will tell
        try:
            readable, _, _ = select.select([self.socket], [], [], 0)
            # A streaming client sends nothing after its request: readable means
            # the end of the connection (recv returns b""), or a reset (it raises).
            return bool(readable) and self.socket.recv(1, socket.MSG_PEEK) == b""
        except ValueError:
            return False  # a TLS socket cannot peek; the next write will tell
        except OSError:
            return True

    def messages(self, heartbeat, until=None):
        """Yield each message as it arrives, and None after each ``heartbeat`` seconds of silence.

        Stop when the client leaves or is dropped, or at the monotonic time ``until``.
        """
        next_heartbeat = time.monotonic() + heartbeat
        while not self.dropped and not self.client_left():
            now = time.monotonic()
            if until is not None and now >= until:
                return
            if now >= next_heartbeat:
                next_heartbeat = now + heartbeat
                yield None
            deadlines = [next_heartbeat, now + CHECK_INTERVAL] + ([until] if until is not None else [])
            try:
                message = self.queue.get(timeout=max(0, min(deadlines) - now))
            except queue.Empty:
                continue
            yield message
            next_heartbeat = time.monotonic() + heartbeat
