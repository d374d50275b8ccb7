"""Several server processes, one stream, through Redis (on when MESSAGE_QUEUE is set).

Redis holds the truth: the stream id, the last id and the history. A value
enters the stream only through ``Cluster.publish``, one Lua script that gives it
the next id, keeps it in the history and publishes it on a channel, all at once.
Every process follows that channel (``Cluster.follow``) and delivers each message
to its own clients, so each process's feed is a mirror of the same stream.

One process produces: the one holding the leader lock, a Redis key that expires
unless its holder renews it. Every process with listeners runs the producer, and
the source returns a value only on the leader. If the leader dies, the key
expires and another process with listeners takes over; ids carry on from Redis,
so none repeats.
"""
import json
import logging
import threading
import time
import uuid

import redis

from protocol import VALUE

KEY_PREFIX = "numbers:"
STREAM_KEY = KEY_PREFIX + "stream"  # the stream id, set once by whichever process comes first
LAST_ID_KEY = KEY_PREFIX + "last_id"
HISTORY_KEY = KEY_PREFIX + "history"  # newest first
LEADER_KEY = KEY_PREFIX + "leader"  # the token of the process that produces
CHANNEL = KEY_PREFIX + "messages"
LEADER_TIMEOUT = 3.0  # seconds after the leader's last renewal before another process takes over
RETRY_DELAY = 1.0  # seconds between attempts to reach Redis again

# Give a message the next id, keep it in the capped history and publish it, in one step.
# KEYS: stream, last id, history. ARGV: a new stream id (used if there is none yet),
# the message without its id and stream as a JSON object, the history size, the channel.
# The JSON is spliced rather than decoded and re-encoded, which would round the numbers.
RECORD_SCRIPT = """
local stream = redis.call('GET', KEYS[1])
if not stream then
  stream = ARGV[1]
  redis.call('SET', KEYS[1], stream)
end
local id = redis.call('INCR', KEYS[2])
local message = '{"id": ' .. id .. ', "stream": ' .. cjson.encode(stream) .. ', ' .. string.sub(ARGV[2], 2)
redis.call('LPUSH', KEYS[3], message)
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
redis.call('PUBLISH', ARGV[4], message)
return message
"""

# Take the leader lock if it is free, or extend it if this process holds it. ARGV: token, ttl in ms.
LEAD_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Let the leader lock go, if this process still holds it. ARGV: token.
RESIGN_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

logger = logging.getLogger("extras.cluster")


def init_app(app):
    """With MESSAGE_QUEUE set: values go through Redis, and the feed mirrors the cluster's stream."""
    url = app.config["MESSAGE_QUEUE"]
    if not url:
        return
    feed = app.extensions["feed"]
    cluster = Cluster(url, app.config["HISTORY_SIZE"], feed.interval, feed.stopped)
    source = feed.source
    feed.source = lambda: source() if cluster.lead() else None  # only the leader produces
    feed.publish = cluster.publish  # Redis gives the ids; the message comes back through follow()
    feed.on_producer_stop.append(cluster.resign)  # let another process lead at once
    feed.health_checks.append(cluster.status)
    socketio = app.extensions["socketio"]
    socketio.start_background_task(cluster.follow, lambda message: mirror(feed, message), socketio.sleep)
    if not cluster.synced.wait(timeout=5):
        logger.warning("Serving without the cluster's history: Redis has not answered yet")


def mirror(feed, message):
    """Deliver a message of the cluster's stream to this process's clients, unless they had it already."""
    with feed.lock:
        if message["stream"] != feed.stream_id:
            # Another stream (the first one this process sees, or Redis was emptied): start afresh.
            feed.stream_id = message["stream"]
            feed.history.clear()
            feed.last_id = 0
        if message["id"] > feed.last_id:
            feed.deliver(message)


def pass_on(raw, deliver):
    """Pass a message from Redis to ``deliver``; log and skip anything else another program put there."""
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not (isinstance(message, dict) and type(message.get("id")) is int and isinstance(message.get("stream"), str)):
        logger.warning("Ignored something in Redis that is not a message of the stream: %r", raw[:100])
        return
    deliver(message)


class Cluster:
    """This process's side of the stream in Redis: publish, follow, and take turns to produce."""

    def __init__(self, url, history_size, interval, stopped):
        self.redis = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=5
        )
        self.history_size = history_size
        self.interval = interval
        self.stopped = stopped  # set when this process shuts down: it must not lead again
        self.token = uuid.uuid4().hex  # names this process in the leader lock
        self.leading = False
        # Taking, renewing and letting go of the leader lock happen one at a time, so
        # that a shutdown that lets it go cannot be undone by a producer renewing it.
        self.leader_lock = threading.Lock()
        self.available = None  # unknown until the first attempt to reach Redis
        self.synced = threading.Event()  # set once the history has been loaded
        self._record = self.redis.register_script(RECORD_SCRIPT)
        self._lead = self.redis.register_script(LEAD_SCRIPT)
        self._resign = self.redis.register_script(RESIGN_SCRIPT)

    def publish(self, value):
        """Add a value to the cluster's stream; return the message, or None if Redis is unavailable."""
        fields = json.dumps({VALUE: value, "time": time.time()}, ensure_ascii=False)
        keys = [STREAM_KEY, LAST_ID_KEY, HISTORY_KEY]
        try:
            message = self._record(keys, [uuid.uuid4().hex, fields, self.history_size, CHANNEL])
        except redis.RedisError as error:
            self._set_available(False, error)
            return None
        return json.loads(message)

    def follow(self, deliver, sleep):
        """Pass ``deliver`` the stream's history, then each new message, for ever; reconnect when Redis fails.

        ``sleep`` is the app's sleep (``socketio.sleep``), so that this also runs under gevent.
        """
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                # Subscribe first, then read the history: a message published in between
                # comes both ways, and ``deliver`` drops the copy by its id.
                pubsub.subscribe(CHANNEL)
                for raw in reversed(self.redis.lrange(HISTORY_KEY, 0, -1)):
                    pass_on(raw, deliver)
                self._set_available(True)
                self.synced.set()
                while True:
                    item = pubsub.get_message(timeout=1.0)
                    if item is not None:
                        pass_on(item["data"], deliver)
            except redis.RedisError as error:
                self._set_available(False, error)
            finally:
                pubsub.close()
            sleep(RETRY_DELAY)

    def lead(self):
        """Take or renew the leader lock; return True if this process is to produce now."""
        # The lock must outlive the time between two renewals, one interval.
        ttl_ms = int((LEADER_TIMEOUT + self.interval) * 1000)
        with self.leader_lock:
            if self.stopped.is_set():
                return False
            try:
                leading = bool(self._lead([LEADER_KEY], [self.token, ttl_ms]))
            except redis.RedisError as error:
                self._set_available(False, error)
                leading = False
            if leading != self.leading:
                logger.info("This process %s the cluster", "leads" if leading else "no longer leads")
            self.leading = leading
        return leading

    def resign(self):
        """Let another process produce at once, rather than after the leader lock expires."""
        with self.leader_lock:
            if not self.leading:
                return
            self.leading = False
            logger.info("This process no longer leads the cluster")
            try:
                self._resign([LEADER_KEY], [self.token])
            except redis.RedisError as error:
                self._set_available(False, error)

    def status(self):
        """Describe the cluster as Redis sees it, for the health check."""
        try:
            stream, last_id, leader = self.redis.mget(STREAM_KEY, LAST_ID_KEY, LEADER_KEY)
        except redis.RedisError as error:
            self._set_available(False, error)
            return {"redis": "unavailable", "leader": False, "leader_exists": None, "problem": "Redis is unavailable"}
        status = {
            "redis": "ok",
            "leader": leader is not None and leader.decode() == self.token,
            "leader_exists": leader is not None,
            "last_id": int(last_id or 0),
        }
        if stream is not None:
            status["stream"] = stream.decode()
        return status

    def _set_available(self, available, error=None):
        """Log once when Redis becomes unavailable, and once when it is back."""
        if available == self.available:
            return
        self.available = available
        if available:
            logger.info("Redis is available: following the cluster's stream")
        else:
            logger.warning("Redis is unavailable (%s); serving on and retrying", error)
