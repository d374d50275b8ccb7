"""A guard in front of Engine.IO's long-polling POSTs: refuse at once what Engine.IO would hang on.

The upstream cause, python-engineio 4.15.1 (the same code in 4.13.x, and in
every 4.x release back to 4.0.0 as far as the source shows):

- ``engineio/server.py``, ``Server.handle_request``: a POST whose
  ``Socket.handle_post_request`` raises an ``EngineIOError`` (a body over
  ``max_http_buffer_size``: ``ContentTooLongError``; a packet that
  ``Socket.receive`` does not take, any type but close, pong, message and
  upgrade: ``UnknownPacketError``) calls ``self.disconnect(sid)``;
- ``Server.disconnect`` calls ``Socket.close()``, whose ``wait`` defaults to True;
- ``engineio/socket.py``, ``Socket.close(wait=True)`` puts the close packet and
  the end marker ``None`` on the session's queue, then ``self.queue.join()``:
  it returns only once a poll has taken both. None ever does: a new GET is
  refused, the session being closed (``Server._get_socket``), and a GET that
  takes the close packet puts the end marker back (``Socket.poll``).

So the POST never gets an answer, and its thread (under gevent: its greenlet
and its socket) is held until the process exits. The same in both of this
app's modes: threading (``queue.Queue``) and gevent (``gevent.queue.JoinableQueue``),
development server and gunicorn alike. The asyncio server has the same shape
(``AsyncServer.handle_request`` -> ``AsyncSocket.close(wait=True)`` -> ``await
self.queue.join()``); this app does not use it.

The one-line fix upstream: on that path close without waiting, in
``Server.handle_request``'s POST ``except exceptions.EngineIOError:``,
``socket.close(wait=False, reason=self.reason.SERVER_DISCONNECT)`` instead of
``self.disconnect(sid)`` (the service task removes closed sessions). Once a
release has it, this guard can go.

Until then this middleware reads each POST to the Engine.IO path itself, decodes
it with Engine.IO's own ``Payload`` and ``Packet`` classes (so that both agree
on every byte), and answers 400 at once to anything that would make Engine.IO
end the session, and to anything it cannot decode. A good body goes on to
Engine.IO unchanged.
"""
import io
import logging
import threading

from engineio import packet, payload

logger = logging.getLogger("extras.polling_guard")

# What engineio.socket.Socket.receive() takes from a client; it raises
# UnknownPacketError, and so hangs the POST, on every other type.
ACCEPTED_PACKET_TYPES = frozenset({packet.CLOSE, packet.PONG, packet.MESSAGE, packet.UPGRADE})

BAD_REQUEST_BODY = b"Bad Request"


def init_app(app):
    """Put the guard in front of the app's Engine.IO."""
    app.wsgi_app = PollingGuard(
        app.wsgi_app,
        app.extensions["socketio"].sockio_mw.engineio_path,  # "/socket.io/": the prefix Engine.IO's middleware answers
        app.config["MAX_MESSAGE_SIZE"],  # what Engine.IO is given as max_http_buffer_size
    )


class PollingGuard:
    """WSGI middleware: answer 400 to a long-polling POST that Engine.IO would never answer."""

    def __init__(self, wsgi_app, engineio_path, max_size):
        self.wsgi_app = wsgi_app
        self.engineio_path = engineio_path
        self.max_size = max_size
        self.logged = set()  # the kinds of refusal logged already
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        # Every POST to the path, whatever its transport parameter: Engine.IO's POST
        # handler only checks that the transport is an allowed one.
        path = environ.get("PATH_INFO") or ""
        if environ.get("REQUEST_METHOD") != "POST" or not path.startswith(self.engineio_path):
            return self.wsgi_app(environ, start_response)
        body, refusal = self.read_body(environ)
        if refusal is not None:
            self.log_once(*refusal)
            start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [BAD_REQUEST_BODY]
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return self.wsgi_app(environ, start_response)

    def read_body(self, environ):
        """Read and check a POST's body; return it and None, or None and (kind, detail) if refused."""
        length = environ.get("CONTENT_LENGTH") or ""
        if not length:
            return None, ("without a Content-Length", "")
        if not (length.isascii() and length.isdigit()):
            return None, ("with a Content-Length that is not a number", repr(length[:20]))
        if len(length) > 18 or int(length) > self.max_size:  # Engine.IO: ContentTooLongError
            return None, ("over MAX_MESSAGE_SIZE", f"{length[:20]} bytes")
        try:
            body = environ["wsgi.input"].read(int(length))
        except (OSError, ValueError) as error:  # the client went away mid-body
            return None, ("whose body did not arrive", type(error).__name__)
        try:
            # As engineio.socket.Socket.handle_post_request() decodes it.
            packets = payload.Payload(encoded_payload=body.decode("utf-8")).packets
        except Exception as error:  # whatever Engine.IO's decoding raises, it raises here first
            return None, ("that does not decode", f"{type(error).__name__}: {str(error)[:80]}")
        for decoded in packets:
            if decoded.packet_type not in ACCEPTED_PACKET_TYPES:  # Engine.IO: UnknownPacketError
                kind = "with a packet Engine.IO does not take from clients"
                return None, (kind, f"type {decoded.packet_type}")
        return body, None

    def log_once(self, kind, detail):
        """Log a refusal in one line, once per kind: any client could otherwise flood the log."""
        with self.lock:
            if kind in self.logged:
                return
            self.logged.add(kind)
        logger.warning(
            "Refused a long-polling POST %s%s (further occurrences are not logged)",
            kind,
            f" ({detail})" if detail else "",
        )
