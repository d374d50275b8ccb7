"""Every setting of the app in one place: its default, what it accepts, and what it means.

Each is read from the environment variable of the same name; tests pass the same
names to ``create_app({...})``. A value the app cannot use stops it at start with
one line that names the setting and what it accepts (``python application.py``
exits with status 2).
"""
import math


class SettingError(ValueError):
    """A setting whose value the app cannot use."""


def number(above=None, at_least=None):
    """Accept a finite number above ``above`` or of at least ``at_least``."""

    def parse(value):
        result = float(value)
        too_small = result <= above if above is not None else result < at_least
        if not math.isfinite(result) or too_small:
            raise ValueError(value)
        return result

    parse.accepts = f"a number above {above:g}" if above is not None else f"a number of at least {at_least:g}"
    return parse


def whole_number(at_least):
    """Accept a whole number of at least ``at_least``."""

    def parse(value):
        if isinstance(value, float) or int(value) < at_least:
            raise ValueError(value)
        return int(value)

    parse.accepts = f"a whole number of at least {at_least}"
    return parse


def one_of(*choices):
    """Accept one of ``choices``."""

    def parse(value):
        if value not in choices:
            raise ValueError(value)
        return value

    parse.accepts = "one of " + ", ".join(choices)
    return parse


def switch(value):
    """Accept 0 or 1 (also as text): off or on."""
    if str(value) not in ("0", "1"):
        raise ValueError(value)
    return str(value) == "1"


switch.accepts = "0 (off) or 1 (on)"


def text(value):
    return str(value)


text.accepts = "any text"


def origins(value):
    """Accept "", "*" or a comma-separated list of origins such as https://example.com."""
    if value in ("", "*"):
        return value
    for origin in value.split(","):
        origin = origin.strip()
        if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
            raise ValueError(value)
    return value


origins.accepts = 'empty (same origin only), "*", or origins like https://example.com, separated by commas'


def redis_url(value):
    """Accept "" or a Redis URL."""
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(value)
    return value


redis_url.accepts = "empty (this process only) or a URL like redis://127.0.0.1:6379/0"


# name: (default, what it accepts, what it means). The extras' settings are read by the extra named.
SETTINGS = {
    "SECRET_KEY": ("", text, "Flask's secret key; empty: a new random key at every start"),
    "INTERVAL": (1.0, number(above=0), "seconds between broadcasts"),
    "HISTORY_SIZE": (10, whole_number(at_least=1), "messages kept for clients that connect or reconnect"),
    "GRACE_PERIOD": (5.0, number(at_least=0), "seconds the producer goes on after the last listener left"),
    "ASYNC_MODE": ("threading", one_of("threading", "gevent"), "gevent also needs `pip install gevent`"),
    "ALLOWED_ORIGINS": ("", origins, "origins of other sites' pages allowed to connect"),
    "PING_INTERVAL": (25.0, number(above=0), "seconds between the server's pings to each client"),
    "PING_TIMEOUT": (20.0, number(above=0), "seconds a client has to answer a ping before it is dropped"),
    "MAX_MESSAGE_SIZE": (10_000, whole_number(at_least=100), "bytes; clients only send their resume data"),
    "HEARTBEAT": (15.0, number(above=0), "extras.streaming: seconds of silence before /stream sends a comment"),
    "PLAIN_PAGE_SECONDS": (300.0, number(above=0), "extras.streaming: how long /plain streams"),
    "PUBLISH_TOKEN": ("", text, "extras.publish: the bearer token of POST /publish; empty: no /publish"),
    "FAST_FANOUT": (1, switch, "extras.fast_fanout: 0 sends each broadcast through every client's queue instead"),
    "MESSAGE_QUEUE": ("", redis_url, "extras.cluster: Redis, to share one stream between processes"),
    "NOTIFICATION_TTL": (
        86400.0,
        number(above=0),
        "extras.notifications: seconds after a user's last notification before their ids and history are forgotten",
    ),
}


def load(environ, overrides=None):
    """Return every setting: its default, overridden by ``environ``, then by ``overrides``; check each.

    Other keys of ``overrides`` (Flask's own, such as TESTING) are passed on as they are.
    """
    config = dict(overrides or {})
    for name, (default, parse, _) in SETTINGS.items():
        value = config.get(name, environ.get(name, default))
        try:
            config[name] = parse(value)
        except (TypeError, ValueError):
            raise SettingError(f"{name}={value!r} cannot be used: it must be {parse.accepts}") from None
    return config


def allowed_origins(setting):
    """Translate ALLOWED_ORIGINS into what Flask-SocketIO and Flask-CORS expect: None means same origin only."""
    if not setting:
        return None
    if setting == "*":
        return "*"
    return [origin.strip() for origin in setting.split(",") if origin.strip()]
