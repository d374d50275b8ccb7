"""The stream over plain HTTP: Server-Sent Events at ``/stream``, and ``/plain``, a page that needs no JavaScript.

Each streaming client is a listener of the feed like a Socket.IO client, with
the same ids, history and resume. A WSGI response is a generator that the server
iterates in the client's own thread or greenlet, and two things make that hard
to get right, done here once for both routes:

- A client that stops reading must not stall anyone else. Each client has its
  own bounded queue; the feed only ever puts to it without waiting, and a client
  whose queue is full is dropped (its connection shut down, which also frees a
  write that is stuck on it).
- A client that goes away must be let go at once, not at the next write. While
  it waits for the next message, the generator looks at the client's socket
  every ``CHECK_INTERVAL`` seconds for the end of the connection.
"""
import itertools
import json
import logging
import queue
import re
import select
import socket
import time

from flask import Blueprint, Response, abort, current_app, request, stream_template
from flask_cors import CORS

import settings
from protocol import EVENT, VALUE

QUEUE_SIZE = 60  # messages a client may fall behind before it is dropped
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

logger = logging.getLogger("extras.streaming")
bp = Blueprint("streaming", __name__)


def init_app(app):
    """Serve /stream and /plain, deliver each message to their clients too, and offer ?transport=sse on the page."""
    subscribers = set()
    app.extensions["streaming_subscribers"] = subscribers
    feed = app.extensions["feed"]
    feed.transports["sse"] = lambda message: offer_to_all(feed, subscribers, message)
    app.extensions["page_transports"].append("sse")
    app.register_blueprint(bp)
    origins = settings.allowed_origins(app.config["ALLOWED_ORIGINS"])
    if origins is not None:
        CORS(app, resources={"/stream": {"origins": origins}})


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
            # poll, not select: select() refuses descriptors of 1024 and above, which
            # a server holding a thousand connections soon hands out.
            readable = select.poll()
            readable.register(self.socket, select.POLLIN)
            if not readable.poll(0):
                return False
            # A streaming client sends nothing after its request: readable means
            # the end of the connection (recv returns b""), or a reset (it raises).
            return self.socket.recv(1, socket.MSG_PEEK) == b""
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


def offer_to_all(feed, subscribers, message):
    """The streaming transport: queue a message for every streaming client; drop those too far behind."""
    for subscriber in list(subscribers):
        if not subscriber.offer(message):
            logger.warning("Dropped a streaming client %d messages behind", QUEUE_SIZE)
            subscribers.remove(subscriber)
            feed.remove_listener()
            subscriber.drop()


def subscribe(last_id):
    """Add a streaming client to the feed; return its Subscriber and the history it missed."""
    feed = current_app.extensions["feed"]
    subscribers = current_app.extensions["streaming_subscribers"]
    subscriber = Subscriber(request.environ)
    with feed.lock:
        missed = feed.missed_since({"last_id": last_id})
        subscribers.add(subscriber)
        feed.add_listener()
    return subscriber, missed


def streaming_response(body, subscriber, **options):
    """Wrap a streamed body in a response that lets the subscriber go when it ends."""
    feed = current_app.extensions["feed"]
    subscribers = current_app.extensions["streaming_subscribers"]

    def unsubscribe():
        """Let the client go, unless offer_to_all() has dropped it already."""
        with feed.lock:
            if subscriber in subscribers:
                subscribers.remove(subscriber)
                feed.remove_listener()

    response = Response(body, headers=STREAMING_HEADERS, **options)
    # WSGI servers call this in a ``finally`` however the response ends: finished,
    # client gone, write failed, or never started because the client left at once.
    response.call_on_close(unsubscribe)
    return response


def event_stream(messages):
    """Frame messages as Server-Sent Events, after a reconnection hint; None is a heartbeat."""
    yield retry_hint()
    for message in messages:
        if message is None:
            yield KEEP_ALIVE
        else:
            yield frame_event(json.dumps(message, ensure_ascii=False), event=EVENT, event_id=message["id"])


def requested_last_id():
    """Return the Last-Event-ID header (sent on reconnect), else the ``last_id`` parameter, else None."""
    value = request.headers.get("Last-Event-ID", request.args.get("last_id"))
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        logger.warning("Ignored a last id that is not an id: %r", value[:40])
        return None
    return int(value)


@bp.get("/stream")
def stream():
    """Send the stream as Server-Sent Events: what the client missed, then each new message."""
    refuse_other_origins()
    subscriber, missed = subscribe(requested_last_id())
    messages = itertools.chain(missed, subscriber.messages(current_app.config["HEARTBEAT"]))
    return streaming_response(event_stream(messages), subscriber, content_type=CONTENT_TYPE)


@bp.get("/plain")
def plain():
    """Serve a page without JavaScript that shows the values as they arrive, for PLAIN_PAGE_SECONDS."""
    subscriber, missed = subscribe(None)
    seconds = current_app.config["PLAIN_PAGE_SECONDS"]
    live = subscriber.messages(current_app.config["HEARTBEAT"], until=time.monotonic() + seconds)
    page = stream_template("plain.html", messages=itertools.chain(missed, live), value=VALUE, minutes=f"{seconds / 60:g}")
    return streaming_response(page, subscriber)


def refuse_other_origins():
    """Answer 403 to a request from a page of another origin that ALLOWED_ORIGINS does not list."""
    origin = request.headers.get("Origin")
    allowed = settings.allowed_origins(current_app.config["ALLOWED_ORIGINS"])
    if origin is None or origin == request.host_url.rstrip("/") or allowed == "*" or origin in (allowed or []):
        return
    logger.warning("Refused %s to origin %r", request.path, origin[:100])
    abort(403)
