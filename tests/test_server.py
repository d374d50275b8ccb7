"""Tests against the real server in a subprocess, with the real python-socketio client over WebSockets."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
import socketio
import websockets.sync.client

from live import PROJECT, live_server  # noqa: F401  (a fixture)
from protocol import VALUE
from support import (  # noqa: F401  (listen_fixture: the fixture)
    Listener,
    assert_consecutive,
    assert_stops_promptly,
    disconnect_all,
    listen_fixture,
    wait_until,
)

@pytest.mark.parametrize("async_mode", ["threading", "gevent"])
def test_burst_of_connects_starts_one_producer_on_a_fixed_schedule(live_server, async_mode):
    interval = 0.1
    server = live_server(ASYNC_MODE=async_mode, INTERVAL=interval)
    listeners = [Listener(server.url) for _ in range(200)]
    start_together = threading.Barrier(len(listeners))
    errors = []

    def connect(listener):
        try:
            start_together.wait()
            listener.connect(wait_timeout=30)
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=connect, args=(listener,)) for listener in listeners]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        wait_until(lambda: server.health()["clients"] == 200, message="200 clients")
        first_common_id = server.health()["last_id"] + 1
        last_common_id = first_common_id + 29
        wait_until(
            lambda: all(last_common_id in listener.ids() for listener in listeners),
            message="30 broadcasts at every client",
        )
        assert server.log().count("Producer started") == 1

        # Everyone saw the same broadcasts, each once and in order.
        reference = None
        for listener in listeners:
            assert_consecutive(listener.ids())
            common = [m for m in listener.messages if first_common_id <= m["id"] <= last_common_id]
            if reference is None:
                reference = common
            assert common == reference

        # The schedule is fixed: broadcast n is due at start + n * interval, so lateness
        # does not grow however long each emit to 200 clients takes. How late each one is
        # depends on how busy the machine is; but after a late broadcast the next one
        # catches up with the schedule, sooner than one interval later, where a producer
        # that slept for an interval after each emit would never send two that close.
        times = [message["time"] for message in reference]
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        catching_up = [gap for gap in gaps if gap < interval]
        assert len(catching_up) >= 3, (
            f"{len(catching_up)} of {len(gaps)} gaps between broadcasts were shorter than the {interval} s "
            f"interval; a fixed schedule makes about half of them so: {gaps}"
        )
    finally:
        disconnect_all(listeners)


def test_late_joiner_gets_history_then_live(live_server, listen):
    server = live_server(INTERVAL=0.05)
    first = listen(server.url)
    wait_until(lambda: server.health()["last_id"] >= 15, message="15 broadcasts")
    late = listen(server.url)
    messages = late.wait_for_count(15)
    first.disconnect()
    late.disconnect()
    ids = [message["id"] for message in messages]
    assert_consecutive(ids)
    # History arrives at once: the ten before the first live one are older than the connect.
    assert len(ids) >= 15 and ids[0] >= 6


def test_resume_gets_exactly_the_missed_broadcasts(live_server, listen):
    # A wide history window: what the client misses while away must still be in it.
    server = live_server(INTERVAL=0.05, HISTORY_SIZE=1000)
    listener = listen(server.url)
    listener.wait_for_count(3)
    listener.disconnect()
    last_seen = listener.messages[-1]
    wait_until(lambda: server.health()["last_id"] >= last_seen["id"] + 4, message="four more broadcasts")

    auth = {"last_id": last_seen["id"], "stream": last_seen["stream"]}
    resumed = listen(server.url, auth=auth)
    messages = resumed.wait_for_count(6)
    resumed.disconnect()
    ids = [message["id"] for message in messages]
    assert ids[0] == last_seen["id"] + 1
    assert_consecutive(ids)


def test_restart_changes_the_stream_id(live_server, listen):
    server = live_server(INTERVAL=0.05)
    listener = listen(server.url)
    before = listener.wait_for_count(5)[-1]
    listener.disconnect()
    assert server.stop() == 0

    server.start()
    auth = {"last_id": before["id"], "stream": before["stream"]}
    resumed = listen(server.url, auth=auth)
    after = resumed.wait_for_count(3)
    resumed.disconnect()
    assert after[0]["stream"] != before["stream"]
    assert after[0]["stream"] == server.health()["stream"]
    assert after[0]["id"] == 1  # a new stream starts again, and the old last_id is ignored


def test_cross_origin_connection_is_refused(live_server, listen):
    server = live_server()
    with pytest.raises(socketio.exceptions.ConnectionError):
        listen(server.url, origin="http://evil.example")
    assert server.health()["clients"] == 0

    same_origin = listen(server.url, origin=server.url)
    wait_until(lambda: server.health()["clients"] == 1, message="same-origin client")
    same_origin.disconnect()


@pytest.mark.parametrize("async_mode", ["threading", "gevent"])
def test_websocket_compression_is_declined(live_server, async_mode):
    """Browsers offer permessage-deflate; for small messages it costs more than it saves (README, "Speed")."""
    server = live_server(ASYNC_MODE=async_mode)
    url = server.url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket"
    with websockets.sync.client.connect(url, compression="deflate", close_timeout=0.1) as websocket:
        assert websocket.recv().startswith("0{")  # Engine.IO's open packet: the connection works
        assert "Sec-WebSocket-Extensions" not in websocket.response.headers


def test_allowed_origins_are_configurable(live_server, listen):
    server = live_server(ALLOWED_ORIGINS="https://app.example, https://other.example")
    friend = listen(server.url, origin="https://other.example")
    wait_until(lambda: server.health()["clients"] == 1, message="listed origin")
    friend.disconnect()
    with pytest.raises(socketio.exceptions.ConnectionError):
        listen(server.url, origin="http://evil.example")


@pytest.mark.parametrize("async_mode", ["threading", "gevent"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stops_promptly_with_clients_connected(live_server, listen, sig, async_mode):
    started = time.monotonic()
    server = live_server(ASYNC_MODE=async_mode, INTERVAL=0.05)
    start_seconds = time.monotonic() - started
    listeners = [listen(server.url) for _ in range(5)]
    for listener in listeners:
        listener.wait_for_count(2)
    assert_stops_promptly(server, sig, start_seconds)
    assert "Stopped" in server.log()
    assert "Traceback" not in server.log()
    assert "KeyboardInterrupt" not in server.log()
    wait_until(lambda: not any(listener.client.connected for listener in listeners), message="clients to notice")


def test_listens_on_localhost_only_by_default(live_server):
    server = live_server()
    assert f"Serving on http://127.0.0.1:{server.port}" in server.log()


def test_gunicorn_command_from_the_readme(live_server, listen):
    command = "gunicorn --worker-class gthread --workers 1 --threads 100 --bind 127.0.0.1:{port} application:create_app()"
    gunicorn = live_server(command=command.split())
    listener = listen(gunicorn.url)
    assert_consecutive([message["id"] for message in listener.wait_for_count(2)])
    listener.disconnect()


def test_a_test_number_source_replaces_next_number(live_server, listen):
    command = ["python", "tests/serve_with_source.py", "sources:markup", "--port", "{port}"]
    server = live_server(command=command)
    listener = listen(server.url)
    (message, *_) = listener.wait_for_count(1)
    listener.disconnect()
    assert message[VALUE] == '<img src="x" onerror="window.injected = true">'


@pytest.mark.parametrize(
    "name, value", [("INTERVAL", "0"), ("HISTORY_SIZE", "many"), ("ASYNC_MODE", "eventlet"), ("PORT", "http")]
)
def test_a_bad_setting_stops_the_server_at_once_with_one_line(name, value):
    command = [sys.executable, "application.py", "--port", "0"] if name != "PORT" else [sys.executable, "application.py"]
    env = {**os.environ, name: value}
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") <= 2 and "Traceback" not in result.stderr, result.stderr  # usage, then the error
    assert name in result.stderr or name.lower() in result.stderr
    assert repr(value) in result.stderr


def test_the_core_alone_serves_the_protocol_end_to_end(live_server):
    """No extras at all: connect, history, live messages and resume still work."""
    command = ["gunicorn", "--worker-class", "gthread", "--threads", "20", "--bind", "127.0.0.1:{port}",
               "application:create_app(extras=[])"]  # fmt: skip
    server = live_server(command=command, INTERVAL=0.05)
    assert requests.get(server.url + "/stream", timeout=5).status_code == 404
    assert "Content-Security-Policy" not in requests.get(server.url + "/", timeout=5).headers
    listener = Listener(server.url).connect()
    try:
        seen = listener.wait_for_count(5)[-1]
    finally:
        listener.disconnect()
    assert_consecutive(listener.ids())
    wait_until(lambda: server.health()["last_id"] >= seen["id"] + 3, message="three more broadcasts")
    resumed = Listener(server.url, auth={"last_id": seen["id"], "stream": seen["stream"]}).connect()
    try:
        assert resumed.wait_for_count(3)[0]["id"] == seen["id"] + 1
    finally:
        resumed.disconnect()
    assert_consecutive(resumed.ids())
