"""Fast fan-out: frame a broadcast once and write it to every client's WebSocket from one loop.

The ordinary path, ``socketio.emit(..., to=room, ignore_queue=True)``, puts the
broadcast on each client's Engine.IO queue; each client's writer (a thread, or
a greenlet under gevent) then wakes, frames it with wsproto and sends it. Most
of the CPU per delivery is that per-client wake and framing. Here the frame is
built once and written straight to each socket with a non-blocking send, from
the loop that fans out. A client whose socket would block, or whose queue still
holds packets its writer has not sent, gets the broadcast on its queue as
before, so each client's order is kept: history, then live, and nothing ever
overtakes what is already queued.

No two writes to one socket may overlap, or their bytes could interleave on the
wire: the Engine.IO writer sends messages, pings and the close packet, and
whoever reads the connection (here its handler, see below) sends WebSocket
pongs and close replies, each with a plain ``sock.send`` and no lock of the
library's own (simple_websocket/ws.py: ``Base.send``, ``Base.close``,
``Base._handle_events``). So each connection's socket is wrapped, right after
the handshake and before anything else writes, in a ``LockedSocket`` that
serializes every write under one lock; the fan-out loop takes that lock
without waiting, or uses the queue.

Fewer threads or greenlets per connection, too. Engine.IO keeps one task per
client asleep until its next ping (engineio/socket.py: ``schedule_ping``
starts ``_send_ping``, which sleeps ``ping_interval``); here one ``Pinger``
sends every client's pings and, in place of Engine.IO's service task, which
wakes once per client, lets go of those that do not answer. Engine.IO keeps a
writer per client asleep on the client's queue (``_websocket_handler``:
``writer``); here a packet put on the queue of a client with nothing waiting
is written at once by whoever puts it, and a writer runs only while packets
wait (``WriterlessQueue``, ``Connection.drain``). And simple-websocket reads
each connection in a thread of its own, which hands each message to the
connection's handler (``Base._thread``, ``Base.receive``); here the handler
reads the socket itself. Of the four threads or greenlets a WebSocket
connection had, one remains: its handler.

On unless the app's ``FAST_FANOUT`` setting is 0 (``FAST_FANOUT=0 python application.py``).
Used only with the library versions it was written and tested against
(``TESTED_VERSIONS``), in the threading and gevent modes with simple-websocket;
otherwise it logs one line and every broadcast takes the ordinary path.
"""
import _socket
import atexit
import collections
import functools
import importlib.metadata
import logging
import socket
import struct
import threading
import time
import weakref

from engineio import exceptions as engineio_exceptions
from engineio import packet as engineio_packet
from engineio.async_drivers._websocket_wsgi import SimpleWebSocketWSGI
from socketio import packet as socketio_packet
from socketio.manager import Manager
from socketio.pubsub_manager import PubSubManager
from simple_websocket import ConnectionClosed
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

from protocol import EVENT, LIVE_ROOM, NAMESPACE

logger = logging.getLogger("extras.fast_fanout")

# Each was read for the details this module depends on (cited where used).
TESTED_VERSIONS = {
    "python-socketio": "5.18.1",
    "python-engineio": "4.15.1",
    "simple-websocket": "1.1.0",
    "wsproto": "1.3.2",
}
ASYNC_MODES = ("threading", "gevent")

# python-socketio Server -> its Fanout; weak, so that the servers of finished apps (tests) go away.
_fanouts = weakref.WeakKeyDictionary()


def init_app(app):
    """Unless FAST_FANOUT is 0, and with the libraries it was tested with, the feed's Socket.IO transport takes
    the fast path."""
    if not app.config["FAST_FANOUT"]:
        return
    socketio = app.extensions["socketio"]
    problem = unsupported(socketio.server)
    if problem:
        logger.warning("Fast fan-out is off: %s", problem)
        return
    _fanouts[socketio.server] = Fanout(socketio.server.eio)
    app.extensions["feed"].transports["socketio"] = (
        lambda message: emit_to_room(socketio, EVENT, message, NAMESPACE, LIVE_ROOM)
    )
    logger.info("Fast fan-out is on (%s mode)", socketio.server.eio.async_mode)


def emit_to_room(socketio, event, data, namespace, room):
    """Send ``event`` with ``data`` to the clients of this process in ``room`` of ``namespace``.

    What ``socketio.emit(event, data, namespace=namespace, to=room, ignore_queue=True)``
    does, through the fast path when ``init_app`` turned it on.
    """
    fanout = _fanouts.get(socketio.server)
    if fanout is None or not fanout.emit(socketio.server, event, data, namespace, room):
        socketio.emit(event, data, namespace=namespace, to=room, ignore_queue=True)


def unsupported(server):
    """Return why the fast path cannot serve this python-socketio server, or None if it can."""
    found = {}
    for name in TESTED_VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if found != TESTED_VERSIONS:
        return "it was tested with {} only; installed: {}".format(
            ", ".join(f"{name} {version}" for name, version in TESTED_VERSIONS.items()),
            ", ".join(f"{name} {version}" for name, version in found.items()),
        )
    eio = server.eio
    if eio.async_mode not in ASYNC_MODES:
        return f"async mode {eio.async_mode!r} (it supports {', '.join(ASYNC_MODES)})"
    websocket_class = eio._async["websocket"]
    if not (isinstance(websocket_class, type) and issubclass(websocket_class, SimpleWebSocketWSGI)):
        return f"the WebSocket server is {websocket_class!r}, not simple-websocket"
    # socketio/pubsub_manager.py: with ignore_queue, PubSubManager.emit is Manager.emit.
    if type(server.manager).emit not in (Manager.emit, PubSubManager.emit):
        return f"the client manager {type(server.manager).__name__} has an emit() of its own"
    return None


def text_frame(text):
    """Return the bytes of one unmasked, final WebSocket text frame holding ``text``.

    Byte for byte what simple-websocket sends for ``ws.send(text)`` on a
    connection without extensions: wsproto's ``FrameProtocol.send_data`` and
    ``_serialize_frame`` (wsproto/frame_protocol.py): FIN + opcode 1, then the
    length in 7 bits, or 126 + 16 bits, or 127 + 64 bits; a server does not mask.
    """
    payload = text.encode("utf-8")
    length = len(payload)
    if length <= 125:
        header = struct.pack("!BB", 0x81, length)
    elif length <= 0xFFFF:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


class Fanout:
    """The fast path of one python-socketio server: its open WebSocket connections, and the emit loop."""

    def __init__(self, eio):
        self.connections = {}  # Engine.IO sid -> Connection, while its WebSocket is open
        self.direct = 0  # deliveries written straight to a socket
        self.finished_by_writer = 0  # of those, frames whose end the client's writer had to write
        self.queued = 0  # deliveries that took the client's queue
        self.reported = False  # whether report_once has logged
        # Engine.IO makes each connection's queue and WebSocket with the classes in
        # eio._async (engineio/base_server.py create_queue; engineio/socket.py
        # _upgrade_websocket). A copy for this server alone: other servers keep theirs.
        classes = dict(eio._async)
        classes["queue"] = writerless_queue_class(classes["queue"], eio.get_queue_empty_exception())
        classes["websocket"] = fanout_websocket_class(classes["websocket"], self)
        eio._async = classes
        self.pinger = Pinger(eio)
        # The Pinger does what Engine.IO's service task would, which it starts
        # with the first connection (engineio/server.py _handle_connect).
        eio.start_service_task = False
        # Engine.IO calls each new socket's schedule_ping() just after its
        # connect handler (engineio/server.py _handle_connect): every client's
        # pings, polling or WebSocket, from the first, are the Pinger's.
        connect_handler = eio.handlers["connect"]

        def connect(sid, environ):
            eio.sockets[sid].schedule_ping = functools.partial(self.pinger.schedule, sid)
            return connect_handler(sid, environ)

        eio.handlers["connect"] = connect
        _log_totals_at_exit()

    def emit(self, server, event, data, namespace, room):
        """Do what python-socketio's ``Server.emit`` and ``Manager.emit`` do for one event, no callback.

        Returns False, having sent nothing, for the packets this path does not
        frame (binary attachments); the caller then takes the ordinary path.
        """
        namespace = namespace or "/"
        # socketio/manager.py Manager.emit: one packet, encoded once, for every participant.
        arguments = list(data) if isinstance(data, tuple) else [] if data is None else [data]
        pkt = server.packet_class(socketio_packet.EVENT, namespace=namespace, data=[event] + arguments)
        encoded = pkt.encode()
        if isinstance(encoded, list):
            return False
        server.logger.info('emitting event "%s" to %s [%s]', event, room or "all", namespace)
        if namespace not in server.manager.rooms:
            return True
        eio_pkt = engineio_packet.Packet(engineio_packet.MESSAGE, encoded)
        # engineio/async_drivers/_websocket_wsgi.py: the writer sends pkt.encode() as text.
        frame = text_frame(eio_pkt.encode())
        direct = queued = partial = 0
        now = time.time()  # for the clients' ping timeouts, as Engine.IO's send checks them
        connections = self.connections
        for _, eio_sid in server.manager.get_participants(namespace, room):
            connection = connections.get(eio_sid)
            outcome = connection.try_send(frame, now) if connection is not None else QUEUE
            if outcome is QUEUE:
                server._send_eio_packet(eio_sid, eio_pkt)  # what Manager.emit calls for each participant
                queued += 1
            elif outcome is not DROPPED:
                direct += 1
                partial += outcome is PARTIAL
        self.direct += direct
        self.queued += queued
        self.finished_by_writer += partial
        return True

    def add(self, eio_socket, websocket):
        """Take a new WebSocket connection on the fast path if it fits; return its Connection, or None."""
        sock = websocket.sock
        # gevent's socket keeps the real one, non-blocking, in _sock (gevent/_socket3.py).
        raw = sock if isinstance(sock, _socket.socket) else getattr(sock, "_sock", None)
        protocol = websocket.ws.connection
        if (
            not isinstance(raw, _socket.socket)
            # A socket with a timeout would make send() wait for room (CPython's
            # sock_call_ex polls first), even with MSG_DONTWAIT.
            or raw.gettimeout() not in (None, 0.0)
            or protocol is None
            or protocol._proto.extensions  # permessage-deflate frames differently
        ):
            return None
        connection = Connection(eio_socket, websocket, raw)
        websocket.sock = LockedSocket(sock, connection)
        self.connections[eio_socket.sid] = connection
        return connection

    def report_once(self, problem):
        """Log a problem the first time only: it would otherwise repeat for every connection."""
        if not self.reported:
            self.reported = True
            logger.warning("Fast fan-out: %s (further occurrences are not logged)", problem)

    def remove(self, eio_sid, connection):
        """Forget a connection whose WebSocket has ended."""
        if self.connections.get(eio_sid) is connection:
            del self.connections[eio_sid]


class Connection:
    """One client's WebSocket on the fast path: its socket, its lock, its Engine.IO state, and the handler
    and writer that take the place of Engine.IO's."""

    def __init__(self, eio_socket, websocket, raw):
        self.eio_socket = eio_socket
        self.queue = eio_socket.queue  # a WriterlessQueue (writerless_queue_class)
        self.websocket = websocket  # simple_websocket.Server
        self.raw = raw
        self.lock = threading.Lock()  # held for every write to the socket, by anyone
        self.remainder = b""  # the end of a frame a non-blocking send did not finish
        self.ended = False  # whether the writer closed the WebSocket: what is still queued is dropped
        self.finished = False  # whether the handler has returned

    def serve(self):
        """Engine.IO's handler for a new WebSocket connection, without its writer.

        What ``_websocket_handler`` (engineio/socket.py) does when the
        connection is not an upgrade from long-polling (upgrades take the
        ordinary path), but that it starts no writer: from here on the queue
        writes the client's packets (``WriterlessQueue.write_through``).
        """
        eio_socket = self.eio_socket
        server = eio_socket.server
        eio_socket.connected = True
        eio_socket.upgraded = True
        self.queue.write_through(self)
        server.logger.info("%s: Upgrade to websocket successful", eio_socket.sid)
        try:
            while True:
                try:
                    message = self.receive()
                    if message and len(message) > server.max_http_buffer_size:
                        raise ValueError("packet is too large")
                except Exception as error:
                    if not eio_socket.closed:
                        server.logger.info('%s: Unexpected error "%s", closing connection', eio_socket.sid, error)
                    break
                if message is None:
                    break  # closed by the client
                pkt = engineio_packet.Packet(encoded_packet=message)
                try:
                    eio_socket.receive(pkt)
                except engineio_exceptions.UnknownPacketError:
                    pass
                except engineio_exceptions.SocketIsClosedError:
                    server.logger.info("Receive error -- socket is closed")
                    break
                except Exception:
                    server.logger.exception("Unknown receive error")
                    break
        finally:
            # Unlike Engine.IO's handler, also when a packet could not be decoded: the
            # client is let go of now, not when its pings time out.
            self.queue.put(None)  # the writer closes the WebSocket
            eio_socket.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)
            # The queue and the connection refer to each other: without this, the client's
            # objects would wait for a full garbage collection to be freed. (The writer
            # started for the None above keeps what it needs.)
            self.queue.connection = None
            self.finished = True
        return []

    def try_send(self, frame, now):
        """Write ``frame`` now without waiting and return SENT (PARTIAL if the writer is to finish
        it), or return QUEUE: the caller is to put it on the client's queue.

        The ordinary path's ``Socket.send`` (engineio/socket.py) first checks the
        client's pings, closing it if it stopped answering; so does this. ``now``
        is ``time.time()``, read once for a whole broadcast.
        """
        eio_socket = self.eio_socket
        if eio_socket.closed or eio_socket.closing:
            return QUEUE
        last_ping = eio_socket.last_ping
        if last_ping and now - last_ping > eio_socket.server.ping_timeout:
            try:
                # Engine.IO's own check, which logs and closes the socket.
                if not eio_socket.check_ping_timeout():
                    return DROPPED  # as Socket.send drops it: the client is gone, and now being closed
            except engineio_exceptions.SocketIsClosedError:
                return QUEUE  # closed by another thread just now: the ordinary path says so in the log
        return self.write_now(frame)

    def write_packet_now(self, pkt):
        """Write an Engine.IO packet as ``write_now`` does; return whether it was written."""
        encoded = pkt.encode()
        # Binary packets, and FinishFrame, are for the writer.
        return isinstance(encoded, str) and self.write_now(text_frame(encoded)) is not QUEUE

    def write_now(self, frame):
        """Write ``frame`` if nothing waits to be written before it and the socket takes it without
        waiting; return SENT, PARTIAL (the writer is to finish it), or QUEUE (nothing was written)."""
        if self.queue.unsent or not self.lock.acquire(blocking=False):
            return QUEUE
        try:
            # Checked again under the lock: the writer writes under it too.
            if (
                self.queue.unsent
                or self.remainder
                or not self.websocket.connected
                or self.websocket.ws.state is not ConnectionState.OPEN
            ):
                return QUEUE
            try:
                sent = self.raw.send(frame, socket.MSG_DONTWAIT)
            except OSError:
                # Full (EAGAIN), or broken: the writer will wait, or find out and close.
                return QUEUE
            if sent < len(frame):
                # Part of the frame is on the wire: its end must follow before any
                # other write. LockedSocket writes it first; the writer, started
                # for this packet, writes it now.
                self.remainder = frame[sent:]
                self.queue.put(FinishFrame())
                return PARTIAL
            return SENT
        finally:
            self.lock.release()

    def start_writer(self):
        self.eio_socket.server.start_background_task(self.drain)

    def drain(self):
        """Engine.IO's writer (``_websocket_handler``: ``writer``) for as long as packets wait: write them
        in order, then end. Told to stop (None), or failing to write, it closes the WebSocket."""
        queue = self.queue
        while (pkt := queue.take()) is not NOTHING:
            try:
                if self.ended:
                    pass  # dropped, as they stay unsent in the queue of Engine.IO's ended writer
                elif pkt is None:
                    self.end()
                elif isinstance(pkt, FinishFrame):
                    self.websocket.sock.finish_frame()
                else:
                    self.websocket.send(pkt.encode())
            except Exception:
                self.end()
            finally:
                queue.done(pkt)

    def end(self):
        """Close the WebSocket, as Engine.IO's writer does when it ends; and the connection, if the client
        does not answer within ``ping_timeout``."""
        self.ended = True
        try:
            if not self.websocket.connected:
                return  # closed by the client
            self.websocket.close()
        except (OSError, ConnectionClosed):
            return  # closed by the client meanwhile
        # The handler reads on until the client answers the close frame, as
        # simple-websocket's reader does: a client that answers nothing, such
        # as one that stopped answering pings, would hold the handler and the
        # connection for as long as its TCP lasts.
        server = self.eio_socket.server
        server.start_background_task(self.end_unanswered, server.ping_timeout)

    def end_unanswered(self, timeout):
        """After ``timeout`` seconds, end the connection if its handler still reads (its recv then ends)."""
        self.eio_socket.server.sleep(timeout)
        if not self.finished:
            try:
                self.raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed just now

    def receive(self):
        """Return the connection's next message, or None once it has ended: simple-websocket's reader
        (``Base._thread`` and ``Base.receive``), run by the thread or greenlet that asks.

        Engine.IO's handler is the only one to ask (engineio/socket.py
        ``_websocket_handler``: its loop calls ``ws.wait()``), so no other
        thread needs to read: the reader simple-websocket would start is not.
        WebSocket pings are answered and closes replied to here, by its
        ``_handle_events``, through the LockedSocket.
        """
        websocket = self.websocket
        while websocket.connected and not websocket.input_buffer:
            try:
                data = websocket.sock.recv(websocket.receive_bytes)
                if not data:
                    raise OSError("the client closed the connection")
                websocket.ws.receive_data(data)
                websocket.connected = websocket._handle_events()
            except (OSError, LocalProtocolError):
                websocket.connected = False
        if websocket.input_buffer:
            return websocket.input_buffer.pop(0)
        websocket.sock.close()  # as the reader does when it ends
        return None

    def write(self, sock, data, *flags):
        """Write for simple-websocket, after the end of an unfinished frame, under the lock; all of it.

        simple-websocket 1.1.0 writes each frame with one ``sock.send`` and
        ignores how much it took (miguelgrinberg/simple-websocket#45, still so
        upstream): under gevent the socket does not block, and a large frame to
        a slow client loses its end, which wedges the connection. Writing all
        of it here mends that for the connections this module serves.
        """
        with self.lock:
            self._finish_frame(sock)
            sock.sendall(data, *flags)
            return len(data)

    def finish_frame(self, sock):
        """Write the end of an unfinished frame, if any (for the writer, started for FinishFrame)."""
        with self.lock:
            self._finish_frame(sock)

    def _finish_frame(self, sock):
        if self.remainder:
            remainder, self.remainder = self.remainder, b""
            sock.sendall(remainder)


class LockedSocket:
    """A connection's socket as simple-websocket sees it: every write goes through the Connection's lock."""

    def __init__(self, sock, connection):
        self._sock = sock
        self._connection = connection

    def send(self, data, *flags):
        return self._connection.write(self._sock, data, *flags)

    def sendall(self, data, *flags):
        with self._connection.lock:
            self._connection._finish_frame(self._sock)
            return self._sock.sendall(data, *flags)

    def finish_frame(self):
        self._connection.finish_frame(self._sock)

    def recv(self, size, *flags):
        return self._sock.recv(size, *flags)

    def __getattr__(self, name):
        return getattr(self._sock, name)  # fileno, close and the rest: as the socket's own


class FinishFrame(engineio_packet.Packet):
    """A packet for the writer that sends nothing new: it finishes the frame a non-blocking send began."""

    def __init__(self):
        super().__init__(engineio_packet.NOOP)

    def encode(self, b64=False):
        return FINISH_FRAME


FINISH_FRAME = object()  # what FinishFrame encodes to: no message, so never written as one
# What Connection.try_send did with a frame.
SENT = "sent"
PARTIAL = "partial"  # wrote its beginning; the client's writer is to write the rest
DROPPED = "dropped"  # nothing: the client stopped answering pings, as Engine.IO's own send drops it
QUEUE = "queue"  # nothing: the caller is to put it on the client's queue
NOTHING = object()  # what WriterlessQueue.take returns when no packet waits


class NoReader:
    """What simple-websocket takes for its reader thread on the fast path: nothing runs."""

    name = "simple_websocket reader (the handler reads)"

    def start(self):
        pass


class Pinger:
    """Engine.IO's pings and ping timeouts, for every client of one server, from one thread or greenlet.

    Engine.IO pings each client ``ping_interval`` seconds after its last pong,
    from a task started for that (engineio/socket.py ``schedule_ping`` and
    ``_send_ping``): one sleeping thread or greenlet per client. And its
    service task checks every client's ping timeout in turn, sleeping between
    clients, so as to visit each once every ``ping_timeout`` (engineio/server.py
    ``_service_task``): at 4000 clients, 200 wake-ups a second. Here each
    client's next ping is an entry in one queue, and the answer each ping
    awaits an entry in another; one task sends the pings, lets go of the
    clients that did not answer within ``ping_timeout``, and forgets the
    closed ones, as the service task does. Every entry of a queue waits as
    long as the others, so each is in order of time. Entries due within
    ``TICK`` of each other are handled in one wake-up. The task ends when both
    queues are empty, and starts again with the next entry.
    """

    TICK = 0.05  # seconds: how late a ping or a timeout may be, so that one wake-up takes several

    def __init__(self, eio):
        self.eio = eio
        self.pings = collections.deque()  # (time.monotonic() of the ping, Engine.IO sid), earliest first
        # (time.time() after which the client is gone, Engine.IO sid, the ping's last_ping), earliest first
        self.answers = collections.deque()
        self.lock = threading.Lock()  # for the two queues and running
        self.running = False

    def schedule(self, sid):
        """``Socket.schedule_ping`` of the client ``sid``: ping it ``ping_interval`` from now."""
        eio_socket = self.eio.sockets.get(sid)
        # Only one ping is awaited at a time; last_ping None means one is scheduled.
        if eio_socket is None or not eio_socket.last_ping:
            return
        eio_socket.last_ping = None
        self.add(self.pings, (time.monotonic() + self.eio.ping_interval, sid))

    def add(self, entries, entry):
        with self.lock:
            entries.append(entry)
            if not self.running:
                self.running = True
                self.eio.start_background_task(self.run)

    def run(self):
        while True:
            with self.lock:
                if not self.pings and not self.answers:
                    self.running = False
                    return
                if self.pings and self.pings[0][0] <= time.monotonic():
                    task, (_, *arguments) = self.ping, self.pings.popleft()
                elif self.answers and self.answers[0][0] < time.time():  # as strict as check_ping_timeout
                    task, (_, *arguments) = self.check_answer, self.answers.popleft()
                else:
                    task = None
                    # A ping scheduled while this sleeps is due ping_interval from then: not before it wakes.
                    wait = self.eio.ping_interval
                    if self.pings:
                        wait = min(wait, self.pings[0][0] - time.monotonic())
                    if self.answers:
                        wait = min(wait, self.answers[0][0] - time.time())
            if task is None:
                self.eio.sleep(max(wait, self.TICK))
                continue
            try:
                task(*arguments)
            except engineio_exceptions.SocketIsClosedError:
                pass  # closed by another thread just now
            except Exception:
                # Every client's pings depend on this task: it goes on.
                logger.exception("Fast fan-out: the Pinger failed on %s", arguments[0])

    def ping(self, sid):
        """``Socket._send_ping``, after its sleep; then await the answer."""
        eio_socket = self.eio.sockets.get(sid)
        if eio_socket is None or self.forget_if_closed(sid, eio_socket) or eio_socket.closing:
            return
        eio_socket.last_ping = sent = time.time()
        eio_socket.send(engineio_packet.Packet(engineio_packet.PING))
        self.add(self.answers, (sent + self.eio.ping_timeout, sid, sent))

    def check_answer(self, sid, sent):
        """Let go of the client ``sid`` if it has not answered the ping ``sent`` (its last_ping)."""
        eio_socket = self.eio.sockets.get(sid)
        if eio_socket is None or self.forget_if_closed(sid, eio_socket):
            return
        # An answer sets last_ping to None (schedule), and the next ping to its own time.
        if eio_socket.last_ping == sent:
            if eio_socket.check_ping_timeout():  # Engine.IO's own check, which logs and closes the socket
                # Not late by the wall clock, which went back: ask again first thing.
                with self.lock:
                    self.answers.appendleft((time.time() + self.TICK, sid, sent))
                return
            self.forget_if_closed(sid, eio_socket)

    def forget_if_closed(self, sid, eio_socket):
        """Forget a closed client's socket, as Engine.IO's service task does; return whether it was closed."""
        if eio_socket.closed:
            self.eio.sockets.pop(sid, None)
        return eio_socket.closed


def writerless_queue_class(base, empty):
    """Return Engine.IO's queue class for one client's packets, with no writer waiting on it on the fast path.

    Engine.IO puts every packet for a client on its queue (engineio/socket.py
    ``Socket.send``, and ``close``'s None, which tells the writer to stop),
    and a writer takes them off it and sends them. Once the client's
    WebSocket is on the fast path (``write_through``), a packet put on the
    queue when nothing waits is written at once, as the fan-out loop writes a
    broadcast (``Connection.write_packet_now``); one that must wait starts a
    writer if none is running (``Connection.drain``), which ends when the
    queue is empty. Until then, and for clients the fast path does not
    serve, the queue is Engine.IO's own.
    """

    class WriterlessQueue(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.connection = None  # the client's Connection, once the queue writes through it
            # Packets put and not yet written: the queue may be empty while its
            # writer writes the last one it took. None is not counted.
            self.unsent = 0
            self.writing = False  # whether a writer is running
            self.state_lock = threading.Lock()  # for the three above

        def put(self, item, *args, **kwargs):
            connection = self.connection
            if connection is not None and item is not None and connection.write_packet_now(item):
                return
            with self.state_lock:
                if item is not None:
                    self.unsent += 1
                super().put(item, *args, **kwargs)
                start = self._start_writer()
            if start:
                self.connection.start_writer()

        def write_through(self, connection):
            """From now on write the packets put here through ``connection``; those waiting first."""
            with self.state_lock:
                self.connection = connection
                start = self._start_writer()
            if start:
                connection.start_writer()

        def _start_writer(self):
            """Whether a writer is to be started now (under the state lock)."""
            if self.connection is None or self.writing or self.empty():
                return False
            self.writing = True
            return True

        def take(self):
            """The writer's next packet, or NOTHING: then the writer ends (it is off the queue at once, under
            the state lock, so that a packet put just after starts another)."""
            with self.state_lock:
                try:
                    return self.get_nowait()
                except empty:
                    self.writing = False
                    return NOTHING

        def done(self, item):
            """The writer is done with ``item``, written or dropped."""
            if item is not None:
                with self.state_lock:
                    self.unsent -= 1
            self.task_done()  # for Socket.close(wait=True), which joins the queue

    return WriterlessQueue


def fanout_websocket_class(base, fanout):
    """Return Engine.IO's WebSocket class, adding each new connection to ``fanout`` while it is open."""

    class FanoutWebSocket(base):
        def __init__(self, handler, server, **kwargs):
            # engineio/socket.py: the handler is the Engine.IO socket's _websocket_handler.
            self.eio_socket = handler.__self__
            self.engineio_handler = handler
            super().__init__(self.serve, server, **kwargs)
            self.connection = None
            if self.eio_socket.connected:
                # An upgrade from long-polling, whose probe and upgrade packets
                # Connection.serve does not read (_websocket_handler). Ordinary path.
                return
            reader_class = self.server_args.get("thread_class", threading.Thread)  # simple-websocket's default

            def start_reader(target):
                # simple_websocket/ws.py Base.__init__ makes its reader thread with
                # thread_class(target=self._thread) after the handshake and before
                # starting it: the last moment at which nothing else writes.
                try:
                    self.connection = fanout.add(self.eio_socket, target.__self__)
                except Exception as error:
                    # Not expected with the tested versions; the connection then simply takes the ordinary path.
                    fanout.report_once(f"a connection takes the ordinary path: {error!r}")
                if self.connection is not None:
                    return NoReader()  # the handler reads: Connection.receive
                return reader_class(target=target)

            self.server_args = {**self.server_args, "thread_class": start_reader}

        def serve(self, websocket):
            """The connection's handler, once the handshake is done: the fast path's, or Engine.IO's."""
            if self.connection is None:
                return self.engineio_handler(websocket)
            try:
                return self.connection.serve()
            finally:
                fanout.remove(self.eio_socket.sid, self.connection)

    return FanoutWebSocket


_exit_hook = []


def _log_totals_at_exit():
    """Log, once when the process ends, how many deliveries each path made (tests and benchmarks read it)."""
    if _exit_hook:
        return
    _exit_hook.append(True)

    def log_totals():
        for fanout in list(_fanouts.values()):
            logger.info(
                "Fast fan-out: %d deliveries written directly (%d finished by the client's writer), "
                "%d through the queue",
                fanout.direct, fanout.finished_by_writer, fanout.queued,
            )

    atexit.register(log_totals)
