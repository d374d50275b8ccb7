"""Notifications for one person: a demo sign-in, a private channel on Socket.IO and on
Server-Sent Events, and notifying a user from anywhere (the protocol: docs/notifications.md).

- **Sign-in** is Flask-Login with a stand-in for a fork's own: ``POST /login`` with a
  name and no password. A fork replaces ``load_user`` and ``login`` with its own.
- **Each user** has their own ids (1, 2, 3, ...), the last HISTORY_SIZE kept, and a
  stream id that changes when their ids begin again (after NOTIFICATION_TTL without
  a notification, the user is forgotten).
- **A signed-in Socket.IO client** is sent its user's history and joins the user's
  room inside the core's connect handler (``feed.on_connect``), under the feed's lock,
  as for the numbers: it neither misses nor repeats a notification in between. The
  client never names the room.
- **With MESSAGE_QUEUE**, Redis holds the ids and histories: one Lua script gives a
  notification its id, keeps it, and publishes it on one channel. Every process follows
  the channel and delivers to its own clients (``ignore_queue``: once per process).
  ``notify(user, text)`` does the same from any program, without an app.
"""
import collections
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid

import click
import redis
from flask import Blueprint, Response, current_app, jsonify, redirect, request, url_for
from flask.cli import with_appcontext
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_socketio import emit, join_room

import settings
from extras.streaming import (
    CONTENT_TYPE,
    KEEP_ALIVE,
    QUEUE_SIZE,
    STREAMING_HEADERS,
    Subscriber,
    frame_event,
    requested_last_id,
    retry_hint,
)
from protocol import GAP_EVENT, NAMESPACE, NOTIFICATION_EVENT, NOTIFY_EVENT

USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")  # the whole name must match
MAX_TEXT = 280  # characters
RATE_LIMIT = 5  # notify_me events a user may send ...
RATE_WINDOW = 10.0  # ... in this many seconds (per process)
ROOM_PREFIX = "user:"  # a user's room is "user:alice": no user can be named like the core's "live" room

KEY_PREFIX = "notifications:"
CHANNEL = KEY_PREFIX + "messages"  # every notification of every user: {"user": ..., "notification": {...}}

# Give a user's notification the user's next id, keep it in their capped history, renew
# the expiry of both keys, and publish it, in one step. KEYS: the user's hash (stream,
# last_id), the user's history (newest first). ARGV: a new stream id (used if the user
# has none: new, or forgotten), the notification without id and stream as a JSON object,
# the history size, the expiry in seconds, the channel, the user as a JSON string.
RECORD_SCRIPT = """
local stream = redis.call('HGET', KEYS[1], 'stream')
if not stream then
  stream = ARGV[1]
  redis.call('HSET', KEYS[1], 'stream', stream)
end
local id = redis.call('HINCRBY', KEYS[1], 'last_id', 1)
local message = '{"id": ' .. id .. ', "stream": ' .. cjson.encode(stream) .. ', ' .. string.sub(ARGV[2], 2)
redis.call('LPUSH', KEYS[2], message)
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], '{"user": ' .. ARGV[6] .. ', "notification": ' .. message .. '}')
return message
"""

logger = logging.getLogger("extras.notifications")
bp = Blueprint("notifications", __name__)
login_manager = LoginManager()


def init_app(app):
    """Add sign-in, the private channel on /test and /notifications/stream, and ``notify`` to /publish and the CLI."""
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"  # a cross-site POST carries no session
    login_manager.init_app(app)
    feed = app.extensions["feed"]
    socketio = app.extensions["socketio"]
    size, ttl, url = app.config["HISTORY_SIZE"], app.config["NOTIFICATION_TTL"], app.config["MESSAGE_QUEUE"]
    if url:
        notifications = ClusterNotifications(feed, socketio, size, ttl, RedisNotifications(url, size, ttl))
        socketio.start_background_task(notifications.follow, socketio.sleep)
    else:
        notifications = Notifications(feed, socketio, size, ttl)
    app.extensions["notifications"] = notifications
    app.extensions["publish_to_user"] = publish_to_user  # POST /publish {"user": ..., "text": ...}
    feed.on_connect.append(join_private_channel)
    # One handler per event for the process's single SocketIO object: each app finds its own
    # state through current_app, so the last app created does not take over the others'.
    socketio.on_event(NOTIFY_EVENT, on_notify_me, namespace=NAMESPACE)
    app.register_blueprint(bp)
    # The page shows its panel, and takes the event names from here.
    app.context_processor(lambda: {"notifications": {"event": NOTIFICATION_EVENT, "notify_event": NOTIFY_EVENT}})
    app.cli.add_command(notify_command)


# Sign-in: a stand-in for a fork's own.


class User(UserMixin):
    """A signed-in person; here only a name. A fork's own user model takes its place."""

    def __init__(self, name):
        self.id = name


@login_manager.user_loader
def load_user(name):
    """Return the user named in the session, or None to treat the session as signed out.

    A fork looks its users up here (a database, an identity provider).
    """
    return User(name) if is_user_name(name) else None


def is_user_name(name):
    return isinstance(name, str) and USER_NAME.fullmatch(name) is not None


def is_text(text):
    return isinstance(text, str) and 1 <= len(text) <= MAX_TEXT


def user_room(user):
    return ROOM_PREFIX + user


def refuse_cross_site():
    """Return a 403 answer to a POST that a page of another site made, else None.

    The browser's Origin says where the request comes from. The app's own pages are
    served with ``Referrer-Policy: no-referrer`` (extras.hardening), under which
    browsers send ``Origin: null`` even for the page's own form; then the browser's
    ``Sec-Fetch-Site``, which no page can set, tells same-origin from cross-site.
    A client that sends neither (curl, a test client) is not a browser a page could use.
    """
    origin = request.headers.get("Origin")
    same_origin = request.host_url.rstrip("/")
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if origin is None or origin == same_origin or (origin == "null" and fetch_site == "same-origin"):
        return None
    logger.warning("Refused a cross-site POST to %s from origin %r", request.path, origin[:100])
    return "Refused: this request comes from another site.", 403


def back_to_page():
    """Redirect to the page, over the transport it used (the form sends it along)."""
    transport = request.form.get("transport")
    if transport in current_app.extensions["page_transports"][1:]:
        return redirect(url_for("index", transport=transport), 303)
    return redirect(url_for("index"), 303)


@bp.post("/login")
def login():
    """Sign in as ``name`` (form field): the demo stand-in for a real sign-in."""
    refused = refuse_cross_site()
    if refused:
        return refused
    name = request.form.get("name", "")
    if not is_user_name(name):
        logger.warning("Refused a sign-in with the name %r", name[:40])
        return "A name is 1 to 32 letters, digits, '_', '.' or '-'.", 400
    login_user(User(name))
    return back_to_page()


@bp.post("/logout")
def logout():
    """Sign out."""
    refused = refuse_cross_site()
    if refused:
        return refused
    logout_user()
    return back_to_page()


# Each user's notifications, in this process.


class Inbox:
    """One user's notifications: their stream, last id and the last few kept; when they were last active."""

    __slots__ = ("stream", "last_id", "history", "active")

    def __init__(self, stream, history_size, now):
        self.stream = stream
        self.last_id = 0
        self.history = collections.deque(maxlen=history_size)
        self.active = now

    def add(self, message):
        """Keep a message; return False if it is one this inbox has had already."""
        if message["stream"] != self.stream:
            # The user was forgotten and their ids began again (in Redis, or another process's).
            self.stream, self.last_id = message["stream"], 0
            self.history.clear()
        if message["id"] <= self.last_id:
            return False
        self.last_id = message["id"]
        self.history.append(message)
        return True

    def catch_up(self, auth):
        """Return the gap signal (or None) and the notifications a connecting client has not seen, oldest first.

        ``auth`` may hold ``last_notification_id`` (and ``notification_stream``), with the
        same rules as the numbers' ``last_id``: anything unusable means "send it all".
        """
        last_id = auth.get("last_notification_id") if isinstance(auth, dict) else None
        stream = auth.get("notification_stream", self.stream) if isinstance(auth, dict) else None
        if type(last_id) is not int or not 0 <= last_id <= self.last_id or stream != self.stream:
            return None, list(self.history)
        gap = None
        if self.history and self.history[0]["id"] > last_id + 1:
            gap = {"channel": "notifications", "after": last_id, "before": self.history[0]["id"]}
        return gap, [message for message in self.history if message["id"] > last_id]


class Inboxes:
    """Every user's inbox in this process, least recently active first; a user inactive for ``ttl`` is forgotten."""

    def __init__(self, history_size, ttl, clock=time.monotonic):
        self.history_size = history_size
        self.ttl = ttl
        self.clock = clock
        self.by_user = collections.OrderedDict()

    def __len__(self):
        return len(self.by_user)

    def get(self, user):
        """Return the user's inbox, or None if they have none (never notified, or forgotten)."""
        self.forget_inactive()
        return self.by_user.get(user)

    def open(self, user, stream=None):
        """Return the user's inbox, new if they have none; count them as active now."""
        self.forget_inactive()
        inbox = self.by_user.get(user)
        if inbox is None:
            inbox = self.by_user[user] = Inbox(stream or uuid.uuid4().hex, self.history_size, self.clock())
        inbox.active = self.clock()
        self.by_user.move_to_end(user)
        return inbox

    def forget_inactive(self):
        """Forget the users inactive for ``ttl``: they are at the front, so this costs one look when nobody is."""
        deadline = self.clock() - self.ttl
        while self.by_user:
            user, inbox = next(iter(self.by_user.items()))
            if inbox.active > deadline:
                return
            del self.by_user[user]


class Notifications:
    """Notify users of this process: ids and histories kept here (MESSAGE_QUEUE is empty)."""

    def __init__(self, feed, socketio, history_size, ttl):
        self.feed = feed  # its lock guards the inboxes and their delivery, as it does the numbers
        self.socketio = socketio
        self.inboxes = Inboxes(history_size, ttl)
        self.subscribers = collections.defaultdict(set)  # user: their Server-Sent Events clients
        self.recent_sends = collections.OrderedDict()  # user: the times of their last notify_me, oldest user first

    def notify(self, user, text):
        """Give the user's next notification its id and deliver it; return it (None if it could not be recorded)."""
        with self.feed.lock:
            inbox = self.inboxes.open(user)
            message = {"text": text, "id": inbox.last_id + 1, "time": time.time(), "stream": inbox.stream}
            self.deliver(user, message)
        return message

    def deliver(self, user, message):
        """Keep a notification and send it to its user's clients in this process. Call it with the lock held."""
        if not self.inboxes.open(user, message["stream"]).add(message):
            return
        self.socketio.emit(NOTIFICATION_EVENT, message, namespace=NAMESPACE, to=user_room(user), ignore_queue=True)
        for subscriber in list(self.subscribers.get(user, ())):
            if not subscriber.offer(message):
                logger.warning("Dropped a notifications stream %d notifications behind", QUEUE_SIZE)
                self.unsubscribe(user, subscriber)
                subscriber.drop()

    def catch_up(self, user, auth):
        """Return the gap signal and the notifications a connecting client of ``user`` missed. Lock held."""
        inbox = self.inbox_for_client(user)
        return (None, []) if inbox is None else inbox.catch_up(auth)

    def inbox_for_client(self, user):
        return self.inboxes.get(user)

    def subscribe(self, user, subscriber):
        self.subscribers[user].add(subscriber)

    def unsubscribe(self, user, subscriber):
        """Let a Server-Sent Events client go (if it is still there). Lock held."""
        subscribers = self.subscribers.get(user)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self.subscribers[user]

    def may_send(self, user, now=None):
        """Count a notify_me of ``user`` in; return False (counting nothing) if it is over the rate limit."""
        now = time.monotonic() if now is None else now
        with self.feed.lock:
            # Forget the senders whose newest send is out of the window: they are at the front.
            while self.recent_sends:
                sender, times = next(iter(self.recent_sends.items()))
                if now - times[-1] < RATE_WINDOW:
                    break
                del self.recent_sends[sender]
            times = self.recent_sends.setdefault(user, collections.deque(maxlen=RATE_LIMIT))
            if len(times) == RATE_LIMIT and now - times[0] < RATE_WINDOW:
                return False
            times.append(now)
            self.recent_sends.move_to_end(user)
            return True


class ClusterNotifications(Notifications):
    """Notify users of a cluster: Redis gives the ids and keeps the histories; this process mirrors its users'."""

    def __init__(self, feed, socketio, history_size, ttl, store):
        super().__init__(feed, socketio, history_size, ttl)
        self.store = store

    def notify(self, user, text):
        """Record the notification in Redis; it comes back to every process, this one too, through ``follow``."""
        try:
            return self.store.record(user, text)
        except redis.RedisError as error:
            logger.warning("Could not notify %s: Redis is unavailable (%s)", user, error)
            return None

    def inbox_for_client(self, user):
        """Return the user's inbox, loaded from Redis if this process does not mirror it yet."""
        inbox = self.inboxes.get(user)
        if inbox is None:
            inbox = self.load(user)
        return inbox

    def load(self, user, before=None):
        """Mirror the user's history from Redis (only ids below ``before``, if given); return the inbox or None."""
        try:
            history = self.store.history(user)
        except redis.RedisError as error:
            logger.warning("Could not read the notifications of %s: Redis is unavailable (%s)", user, error)
            return None
        history = [message for message in history if before is None or message["id"] < before]
        if not history:
            return None
        inbox = self.inboxes.open(user, history[-1]["stream"])
        for message in history:
            inbox.add(message)
        return inbox

    def has_clients_here(self, user):
        participants = self.socketio.server.manager.get_participants(NAMESPACE, user_room(user))
        return user in self.subscribers or next(iter(participants), None) is not None

    def mirror(self, user, message):
        """Deliver a notification from Redis to this process's clients of its user, once. Lock held."""
        if self.inboxes.get(user) is None:
            if not self.has_clients_here(user):
                return  # nobody here to deliver to; a client that connects later reads Redis
            # Start the mirror with what came before this one: what comes after arrives here too.
            self.load(user, before=message["id"])
        self.deliver(user, message)

    def follow(self, sleep):
        """Deliver every notification published in the cluster to this process's clients until the server stops.

        Reconnect when Redis fails, saying so once per outage (extras.cluster logs the outage itself).
        """
        failing = False
        while not self.feed.stopped.is_set():
            pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CHANNEL)
                if failing:
                    logger.info("Following the notifications of the cluster again")
                    failing = False
                while not self.feed.stopped.is_set():
                    item = pubsub.get_message(timeout=1.0)
                    parsed = None if item is None else parse_published(item["data"])
                    if parsed is not None:
                        with self.feed.lock:
                            self.mirror(*parsed)
            except redis.RedisError as error:
                if not failing:
                    logger.warning("Notifications from other processes wait for Redis (%s); retrying", error)
                    failing = True
            finally:
                pubsub.close()
            sleep(1.0)


def parse_published(raw):
    """Return (user, notification) from the channel; log and skip anything else another program put there."""
    try:
        item = json.loads(raw)
    except ValueError:
        item = None
    message = item.get("notification") if isinstance(item, dict) else None
    if (
        not is_user_name(item.get("user") if isinstance(item, dict) else None)
        or not isinstance(message, dict)
        or type(message.get("id")) is not int
        or not isinstance(message.get("stream"), str)
    ):
        logger.warning("Ignored something on %s that is not a notification: %r", CHANNEL, raw[:100])
        return None
    return item["user"], message


class RedisNotifications:
    """The notifications of a cluster in Redis: record one, read a user's history. Needs no app."""

    def __init__(self, url, history_size, ttl):
        self.redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=5)
        self.history_size = history_size
        self.ttl = max(1, round(ttl))  # EXPIRE takes whole seconds
        self._record = self.redis.register_script(RECORD_SCRIPT)

    def record(self, user, text):
        """Give the notification the user's next id, keep and publish it; return it."""
        fields = json.dumps({"text": text, "time": time.time()}, ensure_ascii=False)
        keys = [KEY_PREFIX + "user:" + user, KEY_PREFIX + "history:" + user]
        args = [uuid.uuid4().hex, fields, self.history_size, self.ttl, CHANNEL, json.dumps(user)]
        return json.loads(self._record(keys, args))

    def history(self, user):
        """Return the user's notifications kept in Redis, oldest first."""
        return [json.loads(raw) for raw in reversed(self.redis.lrange(KEY_PREFIX + "history:" + user, 0, -1))]


_worker_store = None
_worker_store_lock = threading.Lock()


def notify(user, text):
    """Notify ``user`` from any program (a worker, a script), with no app: through Redis, like the servers do.

    Reads MESSAGE_QUEUE, HISTORY_SIZE and NOTIFICATION_TTL from the environment.
    Returns the notification; raises ValueError for a bad user or text,
    settings.SettingError for bad settings, redis.RedisError if Redis fails.
    """
    global _worker_store
    if not is_user_name(user):
        raise ValueError(f"{user!r} is not a user name: 1 to 32 letters, digits, '_', '.' or '-'")
    if not is_text(text):
        raise ValueError(f"the text must be a string of 1 to {MAX_TEXT} characters")
    with _worker_store_lock:
        if _worker_store is None:
            config = settings.load(os.environ)
            if not config["MESSAGE_QUEUE"]:
                raise settings.SettingError("MESSAGE_QUEUE is not set: the servers' notifications live in Redis")
            _worker_store = RedisNotifications(
                config["MESSAGE_QUEUE"], config["HISTORY_SIZE"], config["NOTIFICATION_TTL"]
            )
    return _worker_store.record(user, text)


# The private channel: Socket.IO.


def join_private_channel(auth):
    """The connect hook: a signed-in client is sent what its user missed, then joins the user's room."""
    if not current_user.is_authenticated:
        return  # anonymous: the numbers only
    user = current_user.get_id()
    gap, missed = current_app.extensions["notifications"].catch_up(user, auth)
    # To this client directly: through a message queue it could arrive after newer ones.
    if gap is not None:
        emit(GAP_EVENT, gap, ignore_queue=True)
    for message in missed:
        emit(NOTIFICATION_EVENT, message, ignore_queue=True)
    join_room(user_room(user))


def on_notify_me(data=None, *_):
    """A signed-in client notifies itself: ``{"text": ...}``; the acknowledgement is ``{"id": N}`` or ``{"error": ...}``."""
    if not current_user.is_authenticated:
        return refuse_notify_me("anonymous", "Sign in first.")
    user = current_user.get_id()
    text = data.get("text") if isinstance(data, dict) else None
    if not is_text(text):
        return refuse_notify_me(user, f"The text must be a string of 1 to {MAX_TEXT} characters.")
    notifications = current_app.extensions["notifications"]
    if not notifications.may_send(user):
        return refuse_notify_me(user, f"At most {RATE_LIMIT} notifications in {RATE_WINDOW:g} seconds.")
    message = notifications.notify(user, text)
    if message is None:
        return {"error": "The message queue is unavailable; try again."}
    return {"id": message["id"]}


def refuse_notify_me(user, error):
    logger.warning("Refused a notify_me from %s: %s", user, error)
    return {"error": error}


# From anywhere: POST /publish and the command line.


def publish_to_user(body):
    """Handle ``POST /publish`` with ``{"user": ..., "text": ...}`` (its bearer token already checked)."""
    user, text = body.get("user"), body.get("text")
    if not is_user_name(user):
        logger.warning("Refused a publish to a user with a bad name")
        return jsonify(error="The user is 1 to 32 letters, digits, '_', '.' or '-'."), 400
    if not is_text(text):
        logger.warning("Refused a publish to %s with a bad text", user)
        return jsonify(error=f"The text must be a string of 1 to {MAX_TEXT} characters."), 400
    message = current_app.extensions["notifications"].notify(user, text)
    if message is None:
        return jsonify(error="The message queue is unavailable; try again."), 503
    return jsonify(message)


@click.command("notify")
@click.argument("user")
@click.argument("text")
@with_appcontext
def notify_command(user, text):
    """Notify USER with TEXT (every process of a cluster, with MESSAGE_QUEUE set) and print the notification."""
    if not current_app.config["MESSAGE_QUEUE"]:
        raise click.UsageError("set MESSAGE_QUEUE=redis://...: the notifications of a running cluster live there")
    try:
        message = notify(user, text)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    except redis.RedisError as error:
        raise click.ClickException(f"Redis at {current_app.config['MESSAGE_QUEUE']} is unavailable: {error}")
    click.echo(json.dumps(message, ensure_ascii=False))


# The private channel: Server-Sent Events.


@bp.get("/notifications/stream")
def stream():
    """Send the signed-in user's notifications as Server-Sent Events: what they missed, then each new one."""
    if not current_user.is_authenticated:
        logger.warning("Refused /notifications/stream to a client that is not signed in")
        return "Sign in first.", 401
    user = current_user.get_id()
    notifications = current_app.extensions["notifications"]
    feed = current_app.extensions["feed"]
    last_id = requested_last_id()
    subscriber = Subscriber(request.environ)
    with feed.lock:
        gap, missed = notifications.catch_up(user, {} if last_id is None else {"last_notification_id": last_id})
        notifications.subscribe(user, subscriber)

    def unsubscribe():
        with feed.lock:
            notifications.unsubscribe(user, subscriber)

    live = subscriber.messages(current_app.config["HEARTBEAT"])
    response = Response(
        event_stream(gap, itertools.chain(missed, live)), headers=STREAMING_HEADERS, content_type=CONTENT_TYPE
    )
    # Called however the response ends (see extras.streaming.streaming_response).
    response.call_on_close(unsubscribe)
    return response


def event_stream(gap, messages):
    """Frame the gap signal, then notifications, as Server-Sent Events; None is a heartbeat."""
    yield retry_hint()
    if gap is not None:
        yield frame_event(json.dumps(gap), event=GAP_EVENT)
    for message in messages:
        if message is None:
            yield KEEP_ALIVE
        else:
            yield frame_event(json.dumps(message, ensure_ascii=False), event=NOTIFICATION_EVENT, event_id=message["id"])
