"""What a server open to anyone needs: security headers, a log no client can flood, and no
per-connection compression state for WebSockets."""
import logging

# Sent with every response: only this site's own files may run or load in the
# page, its forms may post only to this site (the sign-in of extras.notifications),
# and no other site may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def init_app(app):
    """Add the security headers to every response, quieten Engine.IO's log, and decline WebSocket compression."""
    app.after_request(add_security_headers)
    engineio_logger = app.extensions["socketio"].server.eio.logger
    if not any(isinstance(existing, OncePerKind) for existing in engineio_logger.filters):
        engineio_logger.addFilter(OncePerKind())
    app.wsgi_app = without_websocket_compression(app.wsgi_app)


def add_security_headers(response):
    """Send the security headers with every response."""
    response.headers.update(SECURITY_HEADERS)
    return response


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


def without_websocket_compression(wsgi_app):
    """Wrap a WSGI app so that WebSocket clients are never granted compression (permessage-deflate).

    Browsers always ask for it, and simple-websocket has no setting to decline it.
    Each connection would then keep its own zlib state and compress every message
    on its own, which for messages of a hundred bytes saves nothing and costs,
    measured with ``python -m bench``, about 100 KB of memory per connection and
    10 us of CPU per message sent.
    """

    def refuse_compression(environ, start_response):
        environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)  # the offer the browser sent
        return wsgi_app(environ, start_response)

    return refuse_compression
