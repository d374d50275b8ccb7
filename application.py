"""Server push in Flask: a new random number every second, live in every browser.

Run it with ``python application.py`` and open http://localhost:5000.

How it works, top to bottom:

1. ``next_number()`` makes the value to push. Replace it to push your own data.
2. The first browser to connect to the ``/test`` namespace starts one background
   task, the producer, which broadcasts a ``newnumber`` event on a fixed schedule
   and stops again once nobody has been listening for a while.
3. A ``NumberFeed`` keeps the ids and the last few broadcasts, so that a browser
   that connects (or reconnects) is sent what it missed before it joins the live feed.
4. The same feed goes out three ways: Socket.IO (``/test``), Server-Sent Events
   (``GET /stream``, see ``sse.py``; the page reads it at ``/?transport=sse``) and a
   streamed page without JavaScript (``/plain``).
5. With ``MESSAGE_QUEUE=redis://...`` several processes serve one stream: Redis
   holds the ids and the history, each process mirrors them for its own clients,
   and one process at a time, the leader, produces (see ``cluster.py``).
"""
import os

# gevent must patch the standard library before anything else imports it.
if os.environ.get("ASYNC_MODE") == "gevent":
    from gevent import get_hub, monkey

    monkey.patch_all()
    # Ctrl+C and SIGTERM stop the server: an end, not an error for gevent to print.
    get_hub().NOT_ERROR += (KeyboardInterrupt,)

import argparse
import collections
import hmac
import itertools
import json
import logging
import math
import queue
import random
import secrets
import signal
import sys
import threading
import time
import uuid

from flask import (
    Flask,
    Response,
    abort,
    current_app,
    jsonify,
    render_template,
    request,
    stream_template,
)
from flask_cors import CORS
from flask_socketio import SocketIO, emit, join_room

import cluster
import sse
from extras import fast_fanout

NAMESPACE = "/test"
EVENT = "newnumber"
LIVE_ROOM = "live"  # clients that have been sent their history and now get every broadcast
TRANSPORTS = ("socketio", "sse")  # how the page at / may receive the feed (?transport=), default first

# Every setting can be overridden by an environment variable of the same name.
DEFAULT_SETTINGS = {
    "SECRET_KEY": "",  # empty: a new random key at every start
    "ALLOWED_ORIGINS": "",  # comma-separated; empty: same origin only; "*": any
    "INTERVAL": 1.0,  # seconds between broadcasts
    "HISTORY_SIZE": 10,  # broadcasts kept for clients that connect or reconnect
    "GRACE_PERIOD": 5.0,  # seconds the producer keeps going after the last client leaves
    "ASYNC_MODE": "threading",  # or "gevent" (pip install gevent)
    "HEARTBEAT": 15.0,  # seconds of silence after which /stream sends a comment
    "PLAIN_PAGE_SECONDS": 300.0,  # how long /plain keeps streaming before it asks for a reload
    "PING_INTERVAL": 25.0,  # seconds between the server's pings to each client
    "PING_TIMEOUT": 20.0,  # seconds a client has to answer a ping before it is dropped
    "MAX_MESSAGE_SIZE": 10_000,  # bytes; clients only ever send their auth data
    "MESSAGE_QUEUE": "",  # redis://host:port/db to share one stream between processes; empty: this process only
    "PUBLISH_TOKEN": "",  # the bearer token for POST /publish; empty: no /publish
    "FAST_FANOUT": 0,  # 1: write broadcasts straight to each WebSocket (extras/fast_fanout.py); 0: off
}

# Sent with every response: only this site's own files may run or load in the
# page, and no other site may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

logger = logging.getLogger("application")
socketio = SocketIO()


def next_number():
    """Return the next value to push: a random number in [0, 10) with 3 decimals."""
    return random.randrange(10_000) / 1000


class NumberFeed:
    """The state of the stream: its ids, its recent history and who is listening."""

    def __init__(self, history_size):
        self.stream_id = uuid.uuid4().hex  # new at every start: ids begin again at 1
        self.history = collections.deque(maxlen=history_size)
        self.last_id = 0
        self.clients = 0  # listeners of every transport
        self.subscribers = set()  # the streaming (SSE and /plain) clients' sse.Subscriber
        self.last_client_left = time.monotonic()
        self.producer = None  # the running background task, or None
        self.stopping = False
        self.problem = None  # why broadcasts are being skipped, or None
        self.last_broadcast_time = None
        self.cluster = None  # a cluster.Cluster when the stream is shared through Redis
        # Held while a broadcast goes out and while a new client is sent its
        # history, so that a client never misses nor repeats a broadcast in between.
        # Reentrant: sending to a client that stopped answering pings makes
        # Engine.IO disconnect it there and then, so on_disconnect runs inside broadcast().
        self.lock = threading.RLock()

    def record(self, number):
        """Give a new number the next id and keep it in the history; return the message."""
        message = {
            "number": number,
            "id": self.last_id + 1,
            "time": time.time(),
            "stream": self.stream_id,
        }
        self.keep(message)
        return message

    def keep(self, message):
        """Keep a message in the history; return False if this feed has it already.

        In a cluster, messages come from Redis: one of another stream (Redis was
        emptied) starts the feed afresh.
        """
        if message["stream"] != self.stream_id:
            self.stream_id = message["stream"]
            self.history.clear()
            self.last_id = 0
        if message["id"] <= self.last_id:
            return False
        self.last_id = message["id"]
        self.history.append(message)
        self.last_broadcast_time = message["time"]
        return True

    def missed_since(self, auth):
        """Return the history a connecting client has not seen yet, oldest first.

        ``auth`` is what the client sent when it connected: ``{"last_id": N}``,
        optionally with the ``"stream"`` N came from. Anything else, a ``last_id``
        from another stream or one this stream has not reached, means "send it all".
        """
        last_id = auth.get("last_id") if isinstance(auth, dict) else None
        stream = auth.get("stream", self.stream_id) if isinstance(auth, dict) else None
        if (
            type(last_id) is not int  # bool is an int subclass; it is not an id
            or not 0 <= last_id <= self.last_id
            or stream != self.stream_id
        ):
            last_id = 0
        return [message for message in self.history if message["id"] > last_id]

    def stop(self):
        """Keep the producer from starting again, and stop it at its next tick."""
        with self.lock:
            self.stopping = True

    def status(self):
        """Describe the feed for the health check; in a cluster, with Redis's view of it."""
        status = {
            "status": "degraded" if self.problem else "ok",
            "problem": self.problem,
            "clients": self.clients,
            "last_id": self.last_id,
            "stream": self.stream_id,
            "producer_running": self.producer is not None,
            "last_broadcast_time": self.last_broadcast_time,
        }
        if self.cluster is not None:
            status.update(self.cluster.status())
        return status


def produce_numbers(feed, interval, grace_period):
    """Broadcast a new number every ``interval`` seconds while anyone listens.

    In a cluster every process with listeners runs this loop, and only the one
    that holds the leader lock broadcasts: it logs "Producer started" when it
    takes the lock.
    """
    if feed.cluster is None:
        logger.info("Producer started")
    results = queue.Queue()  # what each call to next_number() returned or raised
    calling_since = None  # when the call still outstanding started, or None
    next_tick = time.monotonic()
    while True:
        # Sleep until a fixed tick rather than for a fixed time, so that the time
        # a broadcast takes does not add up into drift.
        next_tick += interval
        delay = next_tick - time.monotonic()
        if delay > 0:
            socketio.sleep(delay)
        else:
            next_tick = time.monotonic()  # fell behind: carry on, do not burst
        with feed.lock:
            idle = time.monotonic() - feed.last_client_left
            stop = feed.stopping or (feed.clients == 0 and idle >= grace_period)
            if stop:
                feed.producer = None
        if stop:
            if feed.cluster is None:
                logger.info("Producer stopped")
            else:
                feed.cluster.resign()
            return
        if feed.cluster is not None and not feed.cluster.lead(interval):
            continue
        # Call next_number() in a task of its own and wait for it until the next
        # tick at most, so that a source that hangs cannot stop the schedule.
        # Never more than one call at a time: a hanging source is not called again.
        if calling_since is None:
            calling_since = time.monotonic()
            socketio.start_background_task(call_next_number, results)
        try:
            number, error = results.get(timeout=max(0.0, next_tick + interval - time.monotonic()))
        except queue.Empty:
            report_problem(feed, f"next_number() has not returned for {time.monotonic() - calling_since:.1f} s")
            continue
        on_time = time.monotonic() - calling_since <= interval
        calling_since = None
        if not on_time:
            next_tick = time.monotonic()  # a late value: the schedule starts again from it, no burst
        if error is not None:
            report_problem(feed, f"next_number() failed: {error!r}", error)
            continue
        if on_time and feed.problem:
            logger.info("next_number() works again; broadcasts resume")
            feed.problem = None
        broadcast(feed, number)


def call_next_number(results):
    """Call next_number() and put what it returns, or raises, in ``results``."""
    try:
        results.put((next_number(), None))
    except Exception as error:
        results.put((None, error))


def report_problem(feed, problem, error=None):
    """Skip this broadcast; log why only when the source starts to fail, not at every tick."""
    if feed.problem is None:
        logger.warning("%s; skipping broadcasts until it works again", problem, exc_info=error)
    feed.problem = problem


def broadcast(feed, number):
    """Give a number the stream's next id and send it to every live client; return the message.

    In a cluster the number goes to Redis, and every process's ``receive`` (this
    one's too) sends it to its own clients. Returns None if Redis is unavailable.
    """
    if feed.cluster is not None:
        return feed.cluster.publish(number)
    with feed.lock:
        message = feed.record(number)
        fan_out(feed, message)
    return message


def receive(feed, message):
    """Send a message of the cluster's stream to this process's clients, unless they had it already."""
    with feed.lock:
        if feed.keep(message):
            fan_out(feed, message)


def fan_out(feed, message):
    """Send a recorded message to every live client of this process, of every transport.

    Call it with ``feed.lock`` held.
    """
    # ignore_queue: to this process's clients only; in a cluster each process sends to its own.
    fast_fanout.emit_to_room(socketio, EVENT, message, NAMESPACE, LIVE_ROOM)
    for subscriber in list(feed.subscribers):
        if not subscriber.offer(message):
            logger.warning("Dropped a streaming client %d broadcasts behind", sse.QUEUE_SIZE)
            feed.subscribers.remove(subscriber)
            remove_listener(feed)
            subscriber.drop()


def add_listener(feed):
    """Count a new listener of either transport; the first one starts the producer.

    Call it with ``feed.lock`` held, once the listener has its history.
    """
    feed.clients += 1
    if feed.producer is None and not feed.stopping:
        feed.producer = socketio.start_background_task(
            produce_numbers,
            feed,
            current_app.config["INTERVAL"],
            current_app.config["GRACE_PERIOD"],
        )


def remove_listener(feed):
    """Count a listener out; the producer stops once nobody has listened for a grace period.

    Call it with ``feed.lock`` held.
    """
    feed.clients -= 1
    if feed.clients == 0:
        feed.last_client_left = time.monotonic()


def current_feed():
    """Return the feed of the app that is handling this request."""
    return current_app.extensions["number_feed"]


@socketio.on("connect", namespace=NAMESPACE)
def on_connect(auth):
    """A browser connects: send it the history it missed, then add it to the live feed.

    The client may send ``{"last_id": N, "stream": S}`` as auth data when it
    reconnects; it then gets only the broadcasts after N. The first client to
    connect starts the producer.
    """
    feed = current_feed()
    with feed.lock:
        for message in feed.missed_since(auth):
            emit(EVENT, message, ignore_queue=True)  # to this client, not through the message queue
        join_room(LIVE_ROOM)
        add_listener(feed)


@socketio.on("disconnect", namespace=NAMESPACE)
def on_disconnect(reason=None):
    """A browser leaves; the producer stops once nobody has listened for a grace period."""
    feed = current_feed()
    with feed.lock:
        remove_listener(feed)


@socketio.on_error(NAMESPACE)
def on_error(error):
    """Log a failing handler in one line; the stream carries on for everyone else."""
    logger.warning("Socket.IO handler failed for %s: %r", request.sid, error)


def subscribe(feed, last_id):
    """Add a streaming client to the feed; return its ``sse.Subscriber`` and the history it missed."""
    subscriber = sse.Subscriber(request.environ)
    with feed.lock:
        missed = feed.missed_since({"last_id": last_id})
        feed.subscribers.add(subscriber)
        add_listener(feed)
    return subscriber, missed


def unsubscribe(feed, subscriber):
    """Let a streaming client go, unless fan_out() has dropped it already."""
    with feed.lock:
        if subscriber in feed.subscribers:
            feed.subscribers.remove(subscriber)
            remove_listener(feed)


def streaming_response(body, feed, subscriber, **options):
    """Wrap a streamed body in a response that lets the subscriber go when it ends."""
    response = Response(body, headers=sse.STREAMING_HEADERS, **options)
    # WSGI servers call this in a ``finally`` however the response ends: finished,
    # client gone, write failed, or never started because the client left at once.
    response.call_on_close(lambda: unsubscribe(feed, subscriber))
    return response


def event_stream(messages):
    """Frame messages as Server-Sent Events, after a reconnection hint; None is a heartbeat."""
    yield sse.retry_hint()
    for message in messages:
        if message is None:
            yield sse.KEEP_ALIVE
        else:
            data = json.dumps(message, ensure_ascii=False)
            yield sse.frame_event(data, event=EVENT, event_id=message["id"])


def requested_last_id():
    """Return the Last-Event-ID header (sent on reconnect), else the ``last_id`` parameter, else None."""
    value = request.headers.get("Last-Event-ID", request.args.get("last_id"))
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        logger.warning("Ignored a last id that is not an id: %r", value[:40])
        return None
    return int(value)


def refuse_other_origins():
    """Answer 403 to a request from a page of another origin that ALLOWED_ORIGINS does not list."""
    origin = request.headers.get("Origin")
    allowed = allowed_origins(current_app.config["ALLOWED_ORIGINS"])
    own_origin = request.host_url.rstrip("/")
    if origin is None or origin == own_origin or allowed == "*" or origin in (allowed or []):
        return
    logger.warning("Refused %s to origin %r", request.path, origin[:100])
    abort(403)


class OncePerKind(logging.Filter):
    """Let a library's error with a traceback through once per kind of error, as one line.

    python-engineio logs every packet it cannot decode (truncated, unknown type,
    deeply nested JSON, a huge integer) with a full traceback: any client could
    flood the log by sending garbage. Like engineio's own "further occurrences
    of this error" messages, log each kind once and drop the repeats.
    """

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        """Shorten a record with a traceback to one line, or drop it if its kind was logged before."""
        if not record.exc_info:
            return True
        message, error = record.getMessage(), record.exc_info[1]
        if (message, type(error)) in self.seen:
            return False
        self.seen.add((message, type(error)))
        record.msg = "%s: %s: %s (further occurrences are not logged)"
        record.args = (message, type(error).__name__, error)
        record.exc_info = record.exc_text = None
        return True


# Passed to Socket.IO as its Engine.IO logger: errors only, as with its default.
engineio_logger = logging.getLogger("application.engineio")
engineio_logger.setLevel(logging.ERROR)
engineio_logger.addFilter(OncePerKind())


def load_settings(environ):
    """Return the default settings, each overridden by its environment variable."""
    settings = {}
    for name, default in DEFAULT_SETTINGS.items():
        value = environ.get(name)
        settings[name] = default if value is None else type(default)(value)
    return settings


def allowed_origins(setting):
    """Translate ALLOWED_ORIGINS into what Flask-SocketIO and Flask-CORS expect."""
    if not setting:
        return None  # None means same origin only
    if setting == "*":
        return "*"
    return [origin.strip() for origin in setting.split(",") if origin.strip()]


def without_websocket_compression(wsgi_app):
    """Wrap a WSGI app so that WebSocket clients are never granted compression (permessage-deflate).

    Browsers always ask for it. Each connection would then keep its own zlib
    state and compress every message on its own, which for messages of a
    hundred bytes saves nothing and costs, measured with ``python -m bench``,
    about 100 KB of memory per connection and 10 us of CPU per message sent.
    """
    def refuse_compression(environ, start_response):
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)  # the offer the browser sent
        return wsgi_app(environ, start_response)

    return refuse_compression


def create_app(test_config=None):
    """Create the Flask app: settings from the code, then the environment, then ``test_config``."""
    app = Flask(__name__)
    app.config.from_mapping(load_settings(os.environ))
    if test_config is not None:
        app.config.from_mapping(test_config)
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = secrets.token_hex(32)
        logger.info("SECRET_KEY is not set: using a random key for this run")

    feed = NumberFeed(app.config["HISTORY_SIZE"])
    app.extensions["number_feed"] = feed
    origins = allowed_origins(app.config["ALLOWED_ORIGINS"])
    # With a message queue, Flask-SocketIO also passes on what other programs emit
    # through it (a SocketIO(message_queue=...) emitter) to the clients of every process.
    message_queue = app.config["MESSAGE_QUEUE"] or None
    socketio.init_app(
        app,
        async_mode=app.config["ASYNC_MODE"],
        cors_allowed_origins=origins,
        message_queue=message_queue,
        # WebSocket only, no long-polling: python-engineio 4.15.1 holds a thread
        # forever on some malformed long-polling requests (any client could use up
        # the server's threads), and without polling no sticky sessions are needed.
        # Browsers that cannot use WebSockets have Server-Sent Events: /?transport=sse.
        transports=["websocket"],
        ping_interval=app.config["PING_INTERVAL"],
        ping_timeout=app.config["PING_TIMEOUT"],
        max_http_buffer_size=app.config["MAX_MESSAGE_SIZE"],
        engineio_logger=engineio_logger,
    )
    fast_fanout.init_app(app)
    app.wsgi_app = without_websocket_compression(app.wsgi_app)
    if message_queue is not None:
        join_cluster(feed, message_queue, app.config["HISTORY_SIZE"])
    if origins is not None:
        CORS(app, resources={"/stream": {"origins": origins}})

    @app.after_request
    def add_security_headers(response):
        """Send the security headers with every response."""
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/")
    def index():
        """Serve the page that shows the numbers, over Socket.IO or, with ``?transport=sse``, over /stream."""
        transport = request.args.get("transport", TRANSPORTS[0])
        if transport not in TRANSPORTS:
            # Refused rather than ignored: a typo must not quietly show another transport.
            logger.warning("Refused the page with transport %r", transport[:40])
            abort(400, f"Unknown transport: use one of {', '.join(TRANSPORTS)}.")
        return render_template(
            "index.html",
            transport=transport,
            namespace=NAMESPACE,
            event=EVENT,
            history_size=app.config["HISTORY_SIZE"],
        )

    @app.get("/stream")
    def stream():
        """Send the numbers as Server-Sent Events: what the client missed, then each broadcast."""
        refuse_other_origins()
        feed = current_feed()
        subscriber, missed = subscribe(feed, requested_last_id())
        messages = itertools.chain(missed, subscriber.messages(app.config["HEARTBEAT"]))
        return streaming_response(event_stream(messages), feed, subscriber, content_type=sse.CONTENT_TYPE)

    @app.get("/plain")
    def plain():
        """Serve a page without JavaScript that shows the numbers as they arrive, for a while."""
        feed = current_feed()
        subscriber, missed = subscribe(feed, None)
        seconds = app.config["PLAIN_PAGE_SECONDS"]
        live = subscriber.messages(app.config["HEARTBEAT"], until=time.monotonic() + seconds)
        messages = itertools.chain(missed, live)
        page = stream_template("plain.html", messages=messages, minutes=f"{seconds / 60:g}")
        return streaming_response(page, feed, subscriber)

    @app.post("/publish")
    def publish():
        """Put a number into the stream for another program: ``{"number": 4.2}`` with a bearer token."""
        token = app.config["PUBLISH_TOKEN"]
        if not token:
            abort(404)  # off unless a token is set
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            logger.warning("Refused a publish without a bearer token")
            return jsonify(error="Send Authorization: Bearer <PUBLISH_TOKEN>."), 401, {"WWW-Authenticate": "Bearer"}
        if not hmac.compare_digest(given.encode(), token.encode()):
            logger.warning("Refused a publish with a wrong token")
            return jsonify(error="Wrong token."), 403
        body = request.get_json(silent=True)
        number = body.get("number") if isinstance(body, dict) else None
        if not is_finite_number(number):
            logger.warning("Refused a publish without a finite number")
            return jsonify(error='Send a JSON object {"number": <a finite number>}.'), 400
        message = broadcast(current_feed(), number)
        if message is None:
            return jsonify(error="The message queue is unavailable; try again."), 503
        return jsonify(message)

    @app.get("/healthz")
    def healthz():
        """Report whether the stream is alive, for load balancers and monitoring."""
        return jsonify(current_feed().status())

    return app


def join_cluster(feed, url, history_size):
    """Make the feed a mirror of the cluster's stream in Redis, and wait (a little) for its history."""
    feed.cluster = cluster.Cluster(url, history_size)
    socketio.start_background_task(
        feed.cluster.follow, lambda message: receive(feed, message), socketio.sleep
    )
    if not feed.cluster.synced.wait(timeout=5):
        logger.warning("Serving without the cluster's history: Redis has not answered yet")


def stop_feed(app):
    """Stop the app's producer; in a cluster, let another process lead at once."""
    feed = app.extensions["number_feed"]
    feed.stop()
    if feed.cluster is not None:
        feed.cluster.resign()


def is_finite_number(value):
    """Return True for an int or a float that is neither infinite nor NaN (a bool is not a number here)."""
    return type(value) in (int, float) and math.isfinite(value)


def publish_from_command_line(number):
    """Put one number into the cluster's stream in Redis (MESSAGE_QUEUE) and print its message."""
    url = os.environ.get("MESSAGE_QUEUE")
    if not url:
        sys.exit("--publish needs MESSAGE_QUEUE=redis://... (the stream of a running cluster)")
    if not is_finite_number(number):
        sys.exit(f"--publish needs a finite number, not {number}")
    history_size = load_settings(os.environ)["HISTORY_SIZE"]
    message = cluster.Cluster(url, history_size).publish(number)
    if message is None:
        sys.exit(f"Redis at {url} is unavailable")
    print(json.dumps(message))


def main():
    """Run the server from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    parser.add_argument("--debug", action="store_true", help="debug mode with the reloader")
    parser.add_argument(
        "--publish", type=float, metavar="NUMBER", help="put NUMBER into the cluster's stream and exit"
    )
    args = parser.parse_args()
    if args.publish is not None:
        publish_from_command_line(args.publish)
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # The development server logs every request, and a line of garbage after
        # each WebSocket closes: a log any client could flood.
        logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    app = create_app()
    logger.info("Serving on http://%s:%d (%s mode)", args.host, args.port, socketio.async_mode)
    # Stop on SIGTERM (service managers, containers) as cleanly as on Ctrl+C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        socketio.run(
            app,
            host=args.host,
            port=args.port,
            debug=args.debug,
            use_reloader=args.debug,
            log_output=args.debug,
            # The development server also runs with no terminal attached
            # (containers, service managers, CI). Use gunicorn in production.
            allow_unsafe_werkzeug=True,
        )
    except KeyboardInterrupt:
        pass  # the development server swallows Ctrl+C itself; gevent's does not
    stop_feed(app)
    logger.info("Stopped")


if __name__ == "__main__":
    main()
