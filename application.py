"""Server push in Flask: a new random number every second, live in every browser.

Run it with ``python application.py`` and open http://localhost:5000.

Read it top to bottom:

1. ``next_number()`` makes the value to push: replace it to push your own data.
2. ``Feed`` is the stream: it numbers each message, keeps the last few for
   clients that connect late or reconnect, and hands each one to the transports.
3. ``produce()`` is the background task that calls ``next_number()`` on a fixed
   schedule. The first listener starts it; it stops when nobody has listened for a while.
4. The Socket.IO handlers: a client that connects is sent what it missed, then
   joins the room that gets every new message.
5. ``create_app()`` puts it together and plugs in the extras listed in
   ``EXTRAS`` (Server-Sent Events, Redis, /publish, ...): each is one module of
   ``extras/`` and one line there.
"""
import os

# gevent must patch the standard library before anything else imports it.
if os.environ.get("ASYNC_MODE") == "gevent":
    # Unless told otherwise, greenlets do not keep the stack that spawned them (a debugging aid):
    # about 3 KB less per connection.
    os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "false")
    from gevent import get_hub, monkey

    monkey.patch_all()
    # Ctrl+C and SIGTERM stop the server: an end, not an error for gevent to print.
    get_hub().NOT_ERROR += (KeyboardInterrupt,)

import argparse
import collections
import importlib
import logging
import random
import secrets
import signal
import threading
import time
import uuid

from flask import Flask, current_app, jsonify, render_template, request
from flask_socketio import SocketIO, emit, join_room

import settings
from protocol import EVENT, GAP_EVENT, LIVE_ROOM, NAMESPACE, VALUE

# The extras, each a module of extras/ with an init_app(app), plugged in in this order.
# To remove one, delete its line here and its file.
EXTRAS = [
    "extras.hardening",  # security headers, a log no client can flood, no WebSocket compression
    "extras.polling_guard",  # refuses the long-polling requests python-engineio would hang on
    "extras.watchdog",  # next_number() with a deadline; /healthz says "degraded" while it fails
    "extras.streaming",  # the same stream as Server-Sent Events (/stream) and as a page without JavaScript (/plain)
    "extras.publish",  # POST /publish and `flask --app application publish`: values from other programs
    "extras.cluster",  # MESSAGE_QUEUE=redis://...: several processes, one stream, one producer
    "extras.fast_fanout",  # each broadcast framed once and written to every WebSocket; three tasks fewer per client
    "extras.notifications",  # sign-in, and each user's own notifications on /test and /notifications/stream
]

logger = logging.getLogger("application")
socketio = SocketIO()
# Engine.IO logs through the app's logging, errors only (its default would add a handler of its own).
engineio_logger = logging.getLogger("application.engineio")
engineio_logger.setLevel(logging.ERROR)


def next_number():
    """Return the next value to push: a random number in [0, 10) with 3 decimals (None: skip this tick)."""
    return random.randrange(10_000) / 1000


class Feed:
    """The stream: ids, the last few messages, who listens, and the transports that deliver each message."""

    def __init__(self, config):
        self.interval = config["INTERVAL"]
        self.grace_period = config["GRACE_PERIOD"]
        self.stream_id = uuid.uuid4().hex  # new at every start: ids begin again at 1
        self.history = collections.deque(maxlen=config["HISTORY_SIZE"])
        self.last_id = 0
        self.last_broadcast_time = None
        self.listeners = 0  # of every transport
        self.last_listener_left = time.monotonic()
        self.producer = None  # the running background task, or None
        self.stopped = threading.Event()  # set when the server shuts down
        # What the extras plug into:
        self.source = next_number  # called once a tick; the watchdog and the cluster wrap it
        self.transports = {"socketio": send_to_live_room}  # name: a function called with every new message, lock held
        self.health_checks = []  # each returns fields for /healthz; a "problem" among them means 503
        self.on_producer_stop = []  # each is called when the producer stops
        # Each is called with a connecting Socket.IO client's auth data inside the connect
        # handler, lock held, after its history was sent and before it joins the live room
        # (extras.notifications sends the user's own history and joins the user's room).
        self.on_connect = []
        # Held while a message goes out and while a new client is sent its history,
        # so that a client never misses nor repeats a message in between. Reentrant:
        # sending to a client that stopped answering pings makes Engine.IO disconnect
        # it there and then, so the disconnect handler runs inside deliver().
        self.lock = threading.RLock()

    def publish(self, value):
        """Give a value the stream's next id and deliver it; return the message.

        In a cluster, the cluster extra replaces this: Redis gives the ids.
        """
        with self.lock:
            message = {VALUE: value, "id": self.last_id + 1, "time": time.time(), "stream": self.stream_id}
            self.deliver(message)
        return message

    def deliver(self, message):
        """Keep a message in the history and hand it to every transport."""
        with self.lock:
            self.last_id = message["id"]
            self.last_broadcast_time = message["time"]
            self.history.append(message)
            for send in self.transports.values():
                send(message)

    def missed_since(self, auth):
        """Return the history a connecting client has not seen yet, oldest first.

        ``auth`` is what the client sent when it connected: ``{"last_id": N}``,
        optionally with the ``"stream"`` N came from. Anything else, a ``last_id``
        from another stream or one this stream has not reached, means "send it all".
        """
        last_id = self.resume_point(auth) or 0
        return [message for message in self.history if message["id"] > last_id]

    def resume_point(self, auth):
        """Return the ``last_id`` a connecting client resumes from, or None if it sent none that this stream can use."""
        last_id = auth.get("last_id") if isinstance(auth, dict) else None
        stream = auth.get("stream", self.stream_id) if isinstance(auth, dict) else None
        if (
            type(last_id) is not int  # bool is an int subclass; it is not an id
            or not 0 <= last_id <= self.last_id
            or stream != self.stream_id
        ):
            return None
        return last_id

    def gap(self, auth):
        """Return the gap signal for a client that resumes from before the oldest message kept, else None.

        It missed the messages after ``after`` and before ``before`` for good: the history no longer has them.
        """
        last_id = self.resume_point(auth)
        if last_id is None or not self.history or self.history[0]["id"] <= last_id + 1:
            return None
        return {"channel": "numbers", "after": last_id, "before": self.history[0]["id"]}

    def add_listener(self):
        """Count a listener of any transport in; the first one starts the producer. Call it with the lock held."""
        if self.producer is None and not self.stopped.is_set():
            self.producer = socketio.start_background_task(produce, self)
        self.listeners += 1

    def remove_listener(self):
        """Count a listener out. Call it with the lock held."""
        self.listeners -= 1
        if self.listeners == 0:
            self.last_listener_left = time.monotonic()

    def keep_producing(self):
        """Return True while the producer is wanted; else forget it, so that the next listener starts a new one."""
        with self.lock:
            idle = self.listeners == 0 and time.monotonic() - self.last_listener_left >= self.grace_period
            if idle or self.stopped.is_set():
                self.producer = None
                return False
            return True

    def stop(self):
        """Stop the producer for good: the server is shutting down."""
        self.stopped.set()
        for hook in self.on_producer_stop:
            hook()

    def status(self):
        """Describe the stream for /healthz."""
        status = {
            "status": "ok",
            "problem": None,
            "clients": self.listeners,
            "last_id": self.last_id,
            "stream": self.stream_id,
            "producer_running": self.producer is not None,
            "last_broadcast_time": self.last_broadcast_time,
        }
        problems = []
        for check in self.health_checks:
            fields = dict(check())
            problem = fields.pop("problem", None)
            if problem:
                problems.append(problem)
            status.update(fields)
        if problems:
            status.update(status="degraded", problem="; ".join(problems))
        return status


def produce(feed):
    """The background task: publish a new value every INTERVAL seconds while anyone listens."""
    logger.info("Producer started")
    next_tick = time.monotonic()
    skipped = False  # whether the last tick went by without a value
    while True:
        # Sleep until a fixed tick rather than for a fixed time, so that the time
        # each broadcast takes does not add up into drift. A shutdown wakes it.
        next_tick += feed.interval
        delay = next_tick - time.monotonic()
        if delay > 0:
            feed.stopped.wait(delay)
        else:
            next_tick = time.monotonic()  # fell behind: carry on from now, with no burst to catch up
        if not feed.keep_producing():
            break
        try:
            value = feed.source()
        except Exception as error:
            logger.warning("next_number() failed, so this tick is skipped: %r", error)
            value = None
        if value is None:
            skipped = True
            continue
        feed.publish(value)
        if skipped:
            # A value after a gap may be a late one: start the schedule again from it,
            # so that the next one does not follow it at once.
            next_tick, skipped = time.monotonic(), False
    logger.info("Producer stopped")
    for hook in feed.on_producer_stop:
        hook()


def send_to_live_room(message):
    """The Socket.IO transport: send a message to every client of this process in the live room."""
    # ignore_queue: to this process's clients only; with a message queue, each process sends to its own.
    socketio.emit(EVENT, message, namespace=NAMESPACE, to=LIVE_ROOM, ignore_queue=True)


def current_feed():
    """Return the feed of the app that handles this request."""
    return current_app.extensions["feed"]


@socketio.on("connect", namespace=NAMESPACE)
def on_connect(auth):
    """A client connects: send it the messages it missed, then add it to the live room.

    It may send ``{"last_id": N, "stream": S}`` as auth data when it reconnects,
    and then gets only the messages after N; if some of those are no longer kept,
    a ``gap`` event says so first. The first client starts the producer.
    """
    feed = current_feed()
    with feed.lock:
        # To this client directly: through a message queue it could arrive after newer ones.
        gap = feed.gap(auth)
        if gap is not None:
            emit(GAP_EVENT, gap, ignore_queue=True)
        for message in feed.missed_since(auth):
            emit(EVENT, message, ignore_queue=True)
        for hook in feed.on_connect:
            hook(auth)
        join_room(LIVE_ROOM)
        feed.add_listener()


@socketio.on("disconnect", namespace=NAMESPACE)
def on_disconnect(reason=None):
    """A client leaves; the producer stops once nobody has listened for GRACE_PERIOD seconds."""
    feed = current_feed()
    with feed.lock:
        feed.remove_listener()


@socketio.on_error(NAMESPACE)
def on_error(error):
    """Log a handler that failed; a failed connect refuses the client, and the stream goes on for the others."""
    if request.event["message"] == "connect":
        logger.error("Refused a client: the connect handler failed", exc_info=error)
        return False  # what the handler returns: False refuses the connection
    logger.warning("Socket.IO handler %r failed: %r", request.event["message"], error)


def create_app(test_config=None, extras=EXTRAS):
    """Create the app: settings from the code, the environment, then ``test_config``; then the extras."""
    app = Flask(__name__)
    app.config.from_mapping(settings.load(os.environ, test_config))
    if not app.config["SECRET_KEY"]:
        app.config["SECRET_KEY"] = secrets.token_hex(32)
        logger.info("SECRET_KEY is not set: using a random key for this run")
    app.extensions["feed"] = Feed(app.config)
    # Flask-SocketIO 5.7.0 keeps the client manager an earlier init_app made for a
    # message queue, even when this one has none: forget it (tests create many apps).
    socketio.server_options.pop("client_manager", None)
    socketio.init_app(
        app,
        async_mode=app.config["ASYNC_MODE"],
        cors_allowed_origins=settings.allowed_origins(app.config["ALLOWED_ORIGINS"]),
        # With a message queue, what other programs emit through it (Flask-SocketIO's
        # emitter) also reaches the clients of every process.
        message_queue=app.config["MESSAGE_QUEUE"] or None,
        ping_interval=app.config["PING_INTERVAL"],
        ping_timeout=app.config["PING_TIMEOUT"],
        max_http_buffer_size=app.config["MAX_MESSAGE_SIZE"],
        engineio_logger=engineio_logger,
    )
    # The page's ways to receive the stream (?transport=), the default first; extras add theirs.
    app.extensions["page_transports"] = ["socketio"]
    for extra in extras:
        importlib.import_module(extra).init_app(app)

    @app.get("/")
    def index():
        """Serve the page that shows the stream, over Socket.IO unless ``?transport=`` names another way."""
        transports = app.extensions["page_transports"]
        transport = request.args.get("transport", transports[0])
        if transport not in transports:
            # Refused rather than ignored: a typo must not quietly show another transport.
            logger.warning("Refused the page with transport %r", transport[:40])
            return f"Unknown transport: use one of {', '.join(transports)}.", 400
        return render_template(
            "index.html",
            transport=transport,
            transports=transports,
            namespace=NAMESPACE,
            event=EVENT,
            gap_event=GAP_EVENT,
            value=VALUE,
            history_size=app.config["HISTORY_SIZE"],
        )

    @app.get("/healthz")
    def healthz():
        """Report whether the stream is alive: 200 if so, 503 while it is degraded (for load balancers)."""
        status = current_feed().status()
        return jsonify(status), 200 if status["status"] == "ok" else 503

    return app


def main():
    """Run the development server from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", "5000"))
    parser.add_argument("--debug", action="store_true", help="debug mode with the reloader")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # The development server logs every request, and a line of garbage after
        # each WebSocket closes: a log any client could flood.
        logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    try:
        app = create_app()
    except settings.SettingError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
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
    app.extensions["feed"].stop()
    logger.info("Stopped")


if __name__ == "__main__":
    main()
