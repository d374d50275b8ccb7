"""What a server open to anyone needs: security headers, a log no client can flood, no
per-connection compression state for WebSockets, no connection left open after its WebSocket,
and no client events named like the server's own."""
import logging
import socket

logger = logging.getLogger("extras.hardening")

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
    """Add the security headers to every response, quieten Engine.IO's log, decline WebSocket compression,
    close each WebSocket's connection when it ends, and drop the events clients send with reserved names."""
    app.after_request(add_security_headers)
    server = app.extensions["socketio"].server
    server._handle_event = without_reserved_events(server, server._handle_event)
    eio = server.eio
    if not any(isinstance(existing, OncePerKind) for existing in eio.logger.filters):
        eio.logger.addFilter(OncePerKind())
    app.wsgi_app = without_websocket_compression(app.wsgi_app)
    # Engine.IO makes each WebSocket with the class in eio._async (engineio/socket.py
    # _upgrade_websocket). A copy for this server alone: other servers keep theirs.
    eio._async = {**eio._async, "websocket": closing_websocket_class(eio._async["websocket"])}


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


def without_reserved_events(server, handle_event):
    """Wrap python-socketio's ``Server._handle_event`` so that events a client sends named "connect" or
    "disconnect" are dropped, with one log line per name.

    python-socketio hands an event from a client to the handler of its name
    (socketio/server.py ``_handle_event``, ``_trigger_event``), the connect and
    disconnect handlers too: a client that sends "connect" runs the app's
    connect handler again, which counts it in as a listener once more, for
    good.
    """
    logged = set()

    def handle_event_unless_reserved(eio_sid, namespace, id, data):
        name = data[0] if isinstance(data, list) and data else None
        if isinstance(name, str) and name in server.reserved_events:
            if name not in logged:
                logged.add(name)
                logger.warning("Dropped a %r event from a client: the name is reserved "
                               "(further occurrences are not logged)", name)
            return
        return handle_event(eio_sid, namespace, id, data)

    return handle_event_unless_reserved


def closing_websocket_class(base):
    """Return Engine.IO's WebSocket class, closing the client's connection when the WebSocket ends.

    When a WebSocket ends, simple-websocket hands its connection back to the
    server, and Werkzeug's development server and gevent's server keep it open
    as an idle HTTP/1.1 connection, waiting for another request on it: the
    closing handshake is over, but the connection and the thread or greenlet
    reading it stay until the client closes it. python-socketio's client waits
    3 s for that before it closes it itself; a bad client never does. gevent's
    server also reads whatever the client sent after its WebSocket as a request,
    and logs it. gunicorn closes the connection itself.
    """

    class ClosingWebSocket(base):
        def __init__(self, handler, server, **kwargs):
            super().__init__(handler, server, **kwargs)
            # engineio/async_drivers/_websocket_wsgi.py: __call__ runs self.app(self) once the handshake is done.
            self.handler = handler
            self.app = self.handle

        def handle(self, websocket):
            """Run Engine.IO's handler for the WebSocket, and see that the server closes the connection."""
            mode = self.ws.mode  # simple-websocket's name for the server
            if mode == "gevent":
                # gevent's server closes a connection whose request file is closed instead of
                # reading another request from it (gevent/pywsgi.py
                # WSGIHandler.handle_one_request). Nothing reads that file once the WebSocket
                # has begun, and closing it now frees its 8 KB buffer for the connection's
                # life. It is wsgi.input's, or wsgi.input itself, as simple-websocket finds it.
                body = self.ws.environ["wsgi.input"]
                getattr(body, "rfile", body).close()
            try:
                return self.handler(websocket)
            finally:
                if mode == "werkzeug":
                    end_werkzeug_connection(self.ws.sock)

    return ClosingWebSocket


def end_werkzeug_connection(sock):
    """Shut down a WebSocket's socket for Werkzeug's server, which then closes a connection that ends
    where the next request would start."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
        # What the client sent after its close frame is read out first: the server would take it
        # for a request (shutdown leaves what was received readable).
        while sock.recv(65536):
            pass
    except OSError:
        pass  # the client closed it first
