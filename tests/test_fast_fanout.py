"""The fast fan-out (extras/fast_fanout.py): its frames are the library's byte for byte; against the
real server, in both async modes, every client keeps its order (history, then live, nothing lost,
nothing interleaved) under a fuzz of slow readers, pings, closes and reconnects; and a client that
stops reading delays nobody, and later gets everything it was sent."""
import asyncio
import json
import logging
import random
import re
import socket
import struct
import time

import pytest
import websockets
from websockets.asyncio.client import connect
from wsproto.frame_protocol import FrameProtocol

from application import create_app, socketio
from extras import fast_fanout
from live import live_server  # noqa: F401  (a fixture)
from protocol import NAMESPACE
from support import Listener, join_namespace, open_websocket, process_resources, wait_until

MODES = ["threading", "gevent"]
EVENT_PREFIX = f"42{NAMESPACE},"
TOTALS = re.compile(
    r"Fast fan-out: (\d+) deliveries written directly \((\d+) finished by the client's writer\), "
    r"(\d+) through the queue"
)


@pytest.mark.parametrize("text", ["", "x", "x" * 125, "x" * 126, "x" * 65535, "x" * 65536, "π ≈ 3.142 ✓" * 20])
def test_a_frame_is_byte_for_byte_what_wsproto_makes(text):
    library = FrameProtocol(client=False, extensions=[]).send_data(text)
    assert fast_fanout.text_frame(text) == bytes(library)


def fresh_app(**settings):
    return create_app({"TESTING": True, "SECRET_KEY": "test", "INTERVAL": 3600.0, **settings})


def test_on_with_the_tested_libraries_and_clients_that_are_not_websockets_get_the_ordinary_path():
    app = fresh_app(FAST_FANOUT=1)
    feed = app.extensions["feed"]
    client = socketio.test_client(app, namespace=NAMESPACE)
    try:
        assert socketio.server in fast_fanout._fanouts
        client.get_received(NAMESPACE)
        message = feed.publish(4.2)
        received = client.get_received(NAMESPACE)
        assert [packet["args"][0] for packet in received] == [message]
    finally:
        client.disconnect(NAMESPACE)
        feed.stop()


def test_other_library_versions_turn_it_off_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setitem(fast_fanout.TESTED_VERSIONS, "wsproto", "0.0.1")
    with caplog.at_level(logging.INFO, logger=fast_fanout.logger.name):
        app = fresh_app(FAST_FANOUT=1)
    try:
        lines = [record.getMessage() for record in caplog.records if record.name == fast_fanout.logger.name]
        assert len(lines) == 1, lines
        assert lines[0].startswith("Fast fan-out is off: it was tested with"), lines
        assert "wsproto 1.3.2" in lines[0]
        assert socketio.server not in fast_fanout._fanouts
    finally:
        app.extensions["feed"].stop()


def test_on_by_default(monkeypatch):
    monkeypatch.delenv("FAST_FANOUT", raising=False)  # as when the suite runs with FAST_FANOUT=0
    app = fresh_app()
    try:
        assert socketio.server in fast_fanout._fanouts
    finally:
        app.extensions["feed"].stop()


def test_off_with_0():
    app = fresh_app(FAST_FANOUT=0)
    try:
        assert socketio.server not in fast_fanout._fanouts
    finally:
        app.extensions["feed"].stop()


def start_server(live_server, mode, source, fast=1, **settings):
    """Start the real server with ``sources.<source>`` as the number source."""
    command = ["python", "tests/serve_with_source.py", f"sources:{source}", "--port", "{port}"]
    return live_server(command=command, ASYNC_MODE=mode, FAST_FANOUT=fast, **settings)


def stopped_totals(server):
    """Stop the server; return (deliveries written directly, of which finished by the writer, through
    the queue) from its log."""
    assert server.stop() == 0, server.log()
    found = TOTALS.findall(server.log())
    assert len(found) == 1, server.log()
    return tuple(int(number) for number in found[0])


# The fuzz: clients that misbehave each in their own way, over raw WebSockets
# (the websockets library checks every frame: one interleaved byte and it fails
# the connection with a protocol error, which the test reports).


def small_window_socket(port):
    """A TCP connection with a tiny receive buffer and segment size: the server's side of it fills up fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect(("127.0.0.1", port))
    return sock


class FuzzClient:
    """One client of a kind: "steady" reads everything at once; "slow" reads with pauses through a
    small TCP window; "pinger" sends WebSocket pings all the time; "reconnecter" leaves after a short
    while (closing, resetting the connection, or sending Engine.IO's close) and comes back with its
    last id. Each connection's ids are recorded as a session."""

    def __init__(self, kind, seed, port):
        self.kind = kind
        self.rng = random.Random(seed)
        self.port = port
        self.last_id = None
        self.stream = None
        self.sessions = []  # (the last id sent when connecting, or None; the ids received)
        self.errors = []

    async def run(self, until, final):
        """Connect, and reconnect if this kind does, until ``until``; then read up to ``final["id"]``."""
        while True:
            leave_at = None
            if self.kind == "reconnecter" and time.monotonic() < until:
                leave_at = time.monotonic() + self.rng.uniform(0.05, 0.6)
            if not await self.session(leave_at, final):
                return
            if leave_at is None:
                return

    async def session(self, leave_at, final):
        """One connection; return False if the server ended it (an error)."""
        auth = {} if self.last_id is None else {"last_id": self.last_id, "stream": self.stream}
        sock = small_window_socket(self.port) if self.kind == "slow" else None
        url = f"ws://127.0.0.1:{self.port}/socket.io/?EIO=4&transport=websocket"
        options = {"host": "127.0.0.1", "port": self.port} if sock is None else {"sock": sock}
        websocket = await connect(
            url, **options, max_size=None, ping_interval=None, compression=None, close_timeout=2,
            max_queue=1 if self.kind == "slow" else 16,
        )
        ids = []
        self.sessions.append((self.last_id, ids))
        pinger = asyncio.create_task(self.ping_often(websocket)) if self.kind == "pinger" else None
        try:
            await websocket.send(f"40{NAMESPACE},{json.dumps(auth)}")
            while not self.done(leave_at, final):
                try:
                    packet = await asyncio.wait_for(websocket.recv(), 0.05)
                except TimeoutError:
                    continue
                if packet == "2":
                    await websocket.send("3")
                elif packet.startswith(EVENT_PREFIX):
                    _, message = json.loads(packet[len(EVENT_PREFIX):])
                    ids.append(message["id"])
                    self.last_id, self.stream = message["id"], message["stream"]
                if self.kind == "slow" and final["id"] is None:
                    await asyncio.sleep(self.rng.choice([0, 0, 0, 0.02, 0.1]))
        except websockets.ConnectionClosed as closed:
            self.errors.append(f"{self.kind}: the server ended the connection: {closed!r}")
            return False
        finally:
            if pinger is not None:
                pinger.cancel()
        await self.leave(websocket)
        return True

    def done(self, leave_at, final):
        if leave_at is not None:
            return time.monotonic() >= leave_at
        return final["id"] is not None and self.last_id is not None and self.last_id >= final["id"]

    async def ping_often(self, websocket):
        while True:
            await websocket.ping()  # not waiting for the pong: many pings in flight
            await asyncio.sleep(0.003)

    async def leave(self, websocket):
        how = self.rng.choice(["close", "reset", "engineio-close"]) if self.kind == "reconnecter" else "close"
        if how == "reset":
            sock = websocket.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            websocket.transport.abort()
            return
        if how == "engineio-close":
            await websocket.send("1")
        await websocket.close()


async def fuzz(port, kinds, seconds):
    """Run the clients for ``seconds``, then until each has the last broadcast any of them had by then."""
    clients = [FuzzClient(kind, seed, port) for seed, kind in enumerate(kinds)]
    until = time.monotonic() + seconds
    final = {"id": None}
    tasks = [asyncio.create_task(client.run(until, final)) for client in clients]
    await asyncio.sleep(seconds)
    final["id"] = max(client.last_id or 0 for client in clients)
    done, pending = await asyncio.wait(tasks, timeout=60)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()  # an exception in a client is a failure
    behind = [(client.kind, client.last_id) for client, task in zip(clients, tasks) if task in pending]
    assert not behind, f"clients without broadcast {final['id']} after a minute: {behind}"
    return clients, final["id"]


FUZZ_KINDS = ["steady"] * 3 + ["slow"] * 2 + ["pinger"] * 2 + ["reconnecter"] * 3


# The ordinary path too, as a check on the test, in threading mode only: under
# gevent, simple-websocket 1.1.0 cuts the end off a large frame to a slow client
# (miguelgrinberg/simple-websocket#45), and the slow readers here would wait forever.
@pytest.mark.parametrize(
    "mode, fast", [("threading", 1), ("gevent", 1), ("threading", 0)], ids=["threading", "gevent", "ordinary"]
)
def test_each_client_gets_history_then_live_in_order_under_a_fuzz(live_server, mode, fast):
    # Broadcasts of sizes on both sides of the frame-length boundaries, some too
    # large for one non-blocking send; Engine.IO pings three times a second.
    server = start_server(
        live_server, mode, "varied", fast=fast, INTERVAL=0.03, HISTORY_SIZE=500, PING_INTERVAL=0.3
    )
    clients, final = asyncio.run(fuzz(server.port, FUZZ_KINDS, seconds=6))

    assert [error for client in clients for error in client.errors] == []
    for client in clients:
        assert client.last_id >= final, client.kind
        for resumed_from, ids in client.sessions:
            if not ids:
                continue  # a session too short to see a broadcast
            assert ids == list(range(ids[0], ids[0] + len(ids))), (client.kind, ids)
            if resumed_from is not None:
                assert ids[0] == resumed_from + 1, (client.kind, resumed_from, ids[:3])
    reconnecters = [client for client in clients if client.kind == "reconnecter"]
    assert all(len(client.sessions) >= 3 for client in reconnecters)

    if fast:
        direct, _, queued = stopped_totals(server)
        assert direct > 0 and queued > 0, (direct, queued)  # both paths were taken, and mixed


def read_events(connection, until_id):
    """Read from a raw Engine.IO WebSocket until broadcast ``until_id``, answering pings; return the ids."""
    ids = []
    while not ids or ids[-1] < until_id:
        packet = connection.recv()
        if packet == "2":
            connection.send("3")
        elif packet.startswith(EVENT_PREFIX):
            ids.append(json.loads(packet[len(EVENT_PREFIX):])[1]["id"])
    return ids


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_stops_reading_delays_nobody_then_gets_everything(live_server, mode):
    interval = 0.1
    # 64 kB broadcasts: a client that stops reading fills its socket in a few,
    # and the first of them is more than its socket takes at once.
    server = start_server(live_server, mode, "large", INTERVAL=interval)
    watcher = Listener(server.url).connect()
    watcher.wait_for_count(3)

    stalled = open_websocket(
        server.url,
        sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096), (socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)],
    )
    try:
        stalled.send(f"40{NAMESPACE},")
        # It reads its history and two live broadcasts, then nothing for a while.
        before = read_events(stalled, watcher.ids()[-1] + 2)
        stalled_at = len(watcher.ids())
        watcher.wait_for_count(stalled_at + 30, timeout=30)
        arrivals = watcher.arrival_times[stalled_at:]
        gaps = sorted(later - earlier for earlier, later in zip(arrivals, arrivals[1:]))
        assert gaps[len(gaps) // 2] < interval + 0.05, gaps
        assert gaps[-1] < interval + 1.0, gaps

        # Now it reads again: every broadcast, each whole and in order.
        after = read_events(stalled, watcher.ids()[-1])
        ids = before + after
        assert ids == list(range(ids[0], ids[-1] + 1))
    finally:
        stalled.close()
        watcher.disconnect()

    direct, finished_by_writer, queued = stopped_totals(server)
    assert direct > 0 and queued > 0 and finished_by_writer > 0, (direct, finished_by_writer, queued)


@pytest.mark.parametrize("mode", MODES)
def test_reconnecting_clients_resume_without_gaps_or_repeats(live_server, mode):
    server = start_server(live_server, mode, "varied", INTERVAL=0.02, HISTORY_SIZE=500)
    clients, final = asyncio.run(fuzz(server.port, ["reconnecter"] * 6 + ["steady"], seconds=4))
    assert [error for client in clients for error in client.errors] == []
    for client in clients:
        received = [broadcast_id for _, ids in client.sessions for broadcast_id in ids]
        first = received[0]
        assert received == list(range(first, first + len(received))), client.kind  # no gap, no repeat
    wait_until(lambda: server.health()["clients"] == 0, message="every client to be gone")
    direct, _, _ = stopped_totals(server)
    assert direct > 0


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_answers_pings_stays_connected_when_nothing_is_broadcast(live_server, mode):
    # Hardly any broadcasts, and quick pings, each answered: nothing but the pings
    # goes to the client for many times ping_interval + ping_timeout (3.5 s here),
    # after which Engine.IO's writer would have given up, and the Pinger lets go
    # only of a client that does not answer.
    server = live_server(ASYNC_MODE=mode, FAST_FANOUT=1, INTERVAL=3600, PING_INTERVAL=0.5, PING_TIMEOUT=3)
    connection = open_websocket(server.url)
    try:
        assert join_namespace(connection).startswith(f"40{NAMESPACE},")
        pings = 0
        watch_until = time.monotonic() + 8
        while time.monotonic() < watch_until:
            if connection.recv() == "2":  # raises if the server closed the connection
                pings += 1
                connection.send("3")
        assert pings >= 4, pings
        assert server.health()["clients"] == 1
    finally:
        connection.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_client_that_stops_answering_pings_is_let_go_when_nothing_is_broadcast(live_server, mode):
    # No broadcasts, which would find it gone (Engine.IO's Socket.send checks): the
    # Pinger finds it gone ping_timeout after the ping it did not answer, in place of
    # Engine.IO's service task, and the writer started to tell it so sends the close
    # frame. Engine.IO's own handler would then wait for the answer as long as TCP
    # lasts; the fast path's waits ping_timeout.
    server = live_server(ASYNC_MODE=mode, FAST_FANOUT=1, INTERVAL=3600, PING_INTERVAL=0.5, PING_TIMEOUT=1)
    connection = open_websocket(server.url)
    tcp = connection.sock  # the client lets go of it when the server closes the connection
    try:
        assert join_namespace(connection).startswith(f"40{NAMESPACE},")
        assert server.health()["clients"] == 1
        # It reads nothing and answers nothing.
        wait_until(lambda: server.health()["clients"] == 0, message="the client to be let go of")
        # Nor does it answer the server's close frame: the server ends the connection all the same.
        received = b""
        try:
            while chunk := tcp.recv(4096):
                received += chunk
        except TimeoutError:
            pytest.fail(f"the server kept the connection open {tcp.gettimeout()} s after its close frame")
        ping_frame, close_opcode = b"\x81\x012", 0x88
        assert received.startswith(ping_frame) and received[len(ping_frame)] == close_opcode, received
    finally:
        connection.close()
        tcp.close()


@pytest.mark.parametrize("fast, threads_per_client", [(1, 1), (0, 4)], ids=["fast", "ordinary"])
def test_a_websocket_client_costs_one_thread_with_the_fast_path_and_four_without(
    live_server, fast, threads_per_client
):
    # In threading mode each is an OS thread, counted in /proc: the handler; without
    # the fast path also Engine.IO's writer, simple-websocket's reader and the task
    # that sleeps until the client's next ping. (The fast path's writer runs only
    # while packets wait: here, each client's handshake and history.)
    server = live_server(FAST_FANOUT=fast, INTERVAL=3600, PING_INTERVAL=600)  # no ping while it runs
    watcher = open_websocket(server.url)  # starts the producer and, with the fast path, the Pinger
    connections = [watcher]
    try:
        assert join_namespace(watcher).startswith(f"40{NAMESPACE},")
        baseline = wait_for_steady_threads(server.process.pid)
        for _ in range(20):
            connections.append(open_websocket(server.url))
            assert join_namespace(connections[-1]).startswith(f"40{NAMESPACE},")
        expected = baseline + 20 * threads_per_client
        wait_until(
            lambda: process_resources(server.process.pid).threads == expected,
            message=lambda: f"{expected} threads; {process_resources(server.process.pid).threads} now",
        )
    finally:
        for connection in connections:
            connection.close()


def wait_for_steady_threads(pid):
    """The process's thread count, once it is the same twice, a second apart (threads that
    handle a connect end soon after it)."""
    counts = [process_resources(pid).threads]

    def steady():
        counts.append(process_resources(pid).threads)
        return counts[-1] == counts[-2]

    wait_until(steady, interval=1.0, message="a steady thread count")
    return counts[-1]
