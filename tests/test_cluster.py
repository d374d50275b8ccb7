"""Several server processes, one stream: real redis-server, real nginx, real clients (MESSAGE_QUEUE)."""
import http.client
import json
import signal
import subprocess
import sys

import pytest
import redis

from application import create_app, socketio
from live import PROJECT, live_server, nginx, redis_url, require_program  # noqa: F401  (fixtures)
from protocol import NAMESPACE, VALUE
from support import (  # noqa: F401  (listen_fixture, scheduling_delay_fixture: the fixtures)
    assert_consecutive,
    disconnect_all,
    listen_fixture,
    scheduling_delay_fixture,
    wait_until,
)

INTERVAL = 0.2
LEADER_TIMEOUT = 3.0  # cluster.LEADER_TIMEOUT
GUNICORN = ["gunicorn", "-c", "deploy/gunicorn.conf.py", "--bind", "127.0.0.1:{port}", "application:create_app()"]


@pytest.fixture
def start_cluster(redis_url, live_server):
    """Start app processes that share one stream through the test's redis-server (stopped after them)."""

    def start(count=2, command=None, **env):
        return [
            live_server(command, MESSAGE_QUEUE=redis_url, INTERVAL=INTERVAL, GRACE_PERIOD=2, **env)
            for _ in range(count)
        ]

    return start


def open_stream(url, last_id=None, source_address=None, timeout=15):
    """Open ``url``/stream from the given client address; return the connection and its response."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout, source_address=source_address)
    connection.request("GET", "/stream" if last_id is None else f"/stream?last_id={last_id}")
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def next_events(response, count):
    """Read the next ``count`` events of an open stream; return their messages."""
    messages = []
    while len(messages) < count:
        line = response.readline().decode()
        assert line, "the stream ended"
        if line.startswith("data: "):
            messages.append(json.loads(line.removeprefix("data: ")))
    return messages


def read_events(url, count, last_id=None):
    """Read ``count`` events from ``url``/stream; return their messages."""
    connection, response = open_stream(url, last_id)
    try:
        return next_events(response, count)
    finally:
        response.close()
        connection.close()


LEADS = "This process leads the cluster"


def producers_started(servers):
    """How many times a process of the cluster has started to produce (to lead)."""
    return sum(server.log().count(LEADS) for server in servers)


def test_every_client_of_every_process_gets_each_broadcast_once_with_the_same_id(start_cluster, listen):
    servers = start_cluster()
    listeners = [listen(server.url) for server in servers for _ in range(3)]
    try:
        first = max(server.health()["last_id"] for server in servers) + 1
        last = first + 9
        wait_until(
            lambda: all(last in listener.ids() for listener in listeners),
            message="10 broadcasts at every client",
        )
        reference = None
        for listener in listeners:
            assert_consecutive(listener.ids())
            common = [message for message in listener.messages if first <= message["id"] <= last]
            reference = reference or common
            assert common == reference
        # One producer in the cluster: both processes have listeners, one of them leads.
        assert producers_started(servers) == 1
        health = [server.health() for server in servers]
        assert sorted(status["leader"] for status in health) == [False, True]
        assert all(status["leader_exists"] and status["redis"] == "ok" for status in health)
        assert health[0]["stream"] == health[1]["stream"] == reference[0]["stream"]
        assert health[0]["clients"] == health[1]["clients"] == 3
    finally:
        disconnect_all(listeners)


def test_a_client_resumes_on_another_process_without_a_gap(start_cluster, listen):
    server_a, server_b = start_cluster()
    on_a = listen(server_a.url)
    seen = on_a.wait_for_count(3)[-1]
    on_a.disconnect()
    on_b = listen(server_b.url, auth={"last_id": seen["id"], "stream": seen["stream"]})
    try:
        messages = on_b.wait_for_count(5)
        assert messages[0]["id"] == seen["id"] + 1
        assert_consecutive(on_b.ids())
        assert {message["stream"] for message in messages} == {seen["stream"]}
    finally:
        on_b.disconnect()


def test_server_sent_events_on_both_processes_carry_the_same_stream(start_cluster):
    server_a, server_b = start_cluster()
    from_a = read_events(server_a.url, 3)
    last_id = from_a[-1]["id"]
    # The stream of process B, resumed from the last id process A sent.
    from_b = read_events(server_b.url, 3, last_id=last_id)
    assert [message["id"] for message in from_a + from_b] == list(range(from_a[0]["id"], last_id + 4))
    assert {message["stream"] for message in from_a + from_b} == {from_a[0]["stream"]}


def test_killing_the_leader_hands_the_stream_to_another_process_without_duplicates(
    start_cluster, listen, scheduling_delay
):
    servers = start_cluster()
    listeners = [listen(server.url) for server in servers]
    try:
        wait_until(lambda: any(server.health()["leader"] for server in servers), message="a leader")
        leader = next(server for server in servers if server.health()["leader"])
        survivor, listener = next((s, l) for s, l in zip(servers, listeners) if s is not leader)
        listener.wait_for_count(3)
        leader.stop(signal.SIGKILL)
        before = len(listener.ids())
        # The survivor takes over once the dead leader's lock expires.
        wait_until(lambda: len(listener.ids()) >= before + 5, message="5 more")
        assert survivor.health()["leader"]
        assert LEADS in survivor.log()
        messages = listener.wait_for_count(before + 5)
        assert_consecutive([message["id"] for message in messages])
        # The gap in the stream: from the last number before the kill to the first after it.
        # The lock lives LEADER_TIMEOUT + INTERVAL after its last renewal, then the survivor
        # tries again within an interval; beyond that, only the machine's delays.
        resumed, noise = messages[before]["time"] - messages[before - 1]["time"], scheduling_delay.worst()
        expected = LEADER_TIMEOUT + 3 * INTERVAL + 1.5 + noise
        assert resumed < expected, (
            f"the stream resumed {resumed:.2f} s after the last number before the kill; expected under "
            f"{expected:.2f} s, with the {noise:.3f} s of scheduling delay measured meanwhile"
        )
    finally:
        disconnect_all(listeners)


def test_a_leader_that_stops_lets_another_process_produce_at_once(start_cluster, listen):
    (first,) = start_cluster(count=1)
    leaving = listen(first.url)
    leaving.wait_for_count(1)
    (second,) = start_cluster(count=1)
    staying = listen(second.url)
    staying.wait_for_count(3)
    assert first.health()["leader"]
    leaving.disconnect()  # the first process stops producing after its grace period
    wait_until(lambda: LEADS in second.log(), message="the second to lead")
    assert "This process no longer leads the cluster" in first.log()
    count = len(staying.ids())
    messages = staying.wait_for_count(count + 3)
    assert_consecutive([message["id"] for message in messages])
    # It let the lock go rather than waiting for it to expire: waiting would leave a gap
    # of over LEADER_TIMEOUT (the lock outlives its last renewal by that much). A busy
    # machine may stretch a gap by a second or two, not to that.
    gaps = [later["time"] - earlier["time"] for earlier, later in zip(messages, messages[1:])]
    assert max(gaps) < LEADER_TIMEOUT - 2 * INTERVAL, (
        f"longest gap {max(gaps):.2f} s; expected under {LEADER_TIMEOUT - 2 * INTERVAL:.2f} s, "
        f"which a wait for the lock to expire would exceed: {gaps}"
    )


def test_published_numbers_reach_every_process_with_the_stream_ids(start_cluster, listen):
    servers = start_cluster(PUBLISH_TOKEN="secret")
    listeners = [listen(server.url) for server in servers]
    notices = []
    for listener in listeners:
        listener.client.on("notice", notices.append, namespace=NAMESPACE)
    try:
        listeners[0].wait_for_count(1)
        # Over HTTP, to process A, with the README's command.
        curl = [
            require_program("curl", "curl"),
            "--fail-with-body", "--silent",
            "-H", "Authorization: Bearer secret",
            "-H", "Content-Type: application/json",
            "-d", json.dumps({VALUE: 4.25}),
            servers[0].url + "/publish",
        ]  # fmt: skip
        result = subprocess.run(curl, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        published = json.loads(result.stdout)
        # From another program, through Redis, as the README shows.
        command = [sys.executable, "-m", "flask", "--app", "application", "publish", "7.5"]
        env = {**servers[0].env}
        result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        from_command = json.loads(result.stdout)
        for listener in listeners:
            wait_until(lambda: from_command["id"] in listener.ids(), message="the published numbers")
            by_id = {message["id"]: message for message in listener.messages}
            assert by_id[published["id"]] == published and published[VALUE] == 4.25
            assert by_id[from_command["id"]] == from_command and from_command[VALUE] == 7.5
            assert_consecutive(listener.ids())
        # Garbage on the stream's channel is logged and skipped; the stream carries on.
        with redis.Redis.from_url(env["MESSAGE_QUEUE"]) as connection:
            connection.publish("numbers:messages", b"not a message")
        wait_until(lambda: "not a message of the stream" in servers[1].log(), message="the garbage logged")
        count = len(listeners[1].ids())
        listeners[1].wait_for_count(count + 2)
        assert_consecutive(listeners[1].ids())
        # Flask-SocketIO's emitter in another process reaches the clients of every process (other events).
        emitter = (
            "from flask_socketio import SocketIO; SocketIO(message_queue='{url}')"
            ".emit('notice', {{'text': 'hello'}}, namespace='/test')"
        ).format(url=env["MESSAGE_QUEUE"])
        subprocess.run([sys.executable, "-c", emitter], check=True, timeout=30)
        wait_until(lambda: len(notices) == 2, message="the notice at both clients")
        assert notices == [{"text": "hello"}] * 2
    finally:
        disconnect_all(listeners)


def test_through_nginx_clients_of_both_backends_see_one_stream(start_cluster, nginx, listen):
    servers = start_cluster(command=GUNICORN)
    url = nginx([server.port for server in servers])
    websocket_client = listen(url)  # a WebSocket through nginx's upgrade headers
    # ip_hash sends each /24 to one backend: clients from several loopback /24s reach both.
    streams = []
    try:
        for network in range(1, 9):
            streams.append(open_stream(url, source_address=(f"127.0.{network}.1", 0)))
        first = [next_events(response, 1)[0] for _, response in streams]
        last = max(message["id"] for message in first) + 3
        received = [
            [message] + next_events(response, last - message["id"])
            for message, (_, response) in zip(first, streams)
        ]
        health = [server.health() for server in servers]
        assert all(status["clients"] >= 1 for status in health), health
        assert sum(status["clients"] for status in health) == len(streams) + 1
        assert health[0]["stream"] == health[1]["stream"]
        wait_until(lambda: last in websocket_client.ids(), message="the WebSocket client to catch up")
        websocket_messages = {message["id"]: message for message in websocket_client.messages}
        for messages in received:
            assert_consecutive([message["id"] for message in messages])
            assert messages[-1]["id"] == last
            for message in messages:
                if message["id"] in websocket_messages:
                    assert message == websocket_messages[message["id"]]
    finally:
        for connection, response in streams:
            response.close()
            connection.close()


def test_without_redis_a_process_serves_on_and_says_so(start_cluster, redis_url, listen):
    (server,) = start_cluster(count=1)
    listen(server.url).wait_for_count(2)
    with redis.Redis.from_url(redis_url) as connection:
        connection.shutdown(nosave=True)
    wait_until(lambda: server.health()["redis"] == "unavailable", message="/healthz to say so")
    wait_until(lambda: "Redis is unavailable" in server.log(), message="a line in the log")
    listen(server.url)  # a newcomer is still served
    assert server.health()["clients"] == 2
    assert server.log().count("Redis is unavailable") == 1


def test_a_process_that_shuts_down_never_leads_again(redis_url):
    app = create_app({"TESTING": True, "INTERVAL": 0.2, "MESSAGE_QUEUE": redis_url})
    feed = app.extensions["feed"]
    connection = redis.Redis.from_url(redis_url)
    try:
        assert feed.source() is not None  # the only process: it leads, and produces
        assert connection.exists("numbers:leader")
        feed.stop()
        assert not connection.exists("numbers:leader")  # let go at once
        # A producer still inside its tick when the shutdown came must not take the lock again.
        assert feed.source() is None
        assert not connection.exists("numbers:leader")
    finally:
        feed.stop()
        connection.close()


# --- POST /publish, in one process (no Redis needed) ---


@pytest.fixture
def publishing_app():
    app = create_app({"TESTING": True, "SECRET_KEY": "test", "INTERVAL": 3600.0, "PUBLISH_TOKEN": "secret"})
    yield app
    app.extensions["feed"].stop()


def test_publish_is_off_without_a_token(client):
    assert client.post("/publish", json={VALUE: 1}).status_code == 404


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"Authorization": "secret"}, 401),
        ({"Authorization": "Basic c2VjcmV0"}, 401),
        ({"Authorization": "Bearer wrong"}, 403),
        ({"Authorization": "Bearer secretsecret"}, 403),
    ],
)
def test_publish_refuses_a_missing_or_wrong_token(publishing_app, headers, status):
    response = publishing_app.test_client().post("/publish", json={VALUE: 1}, headers=headers)
    assert response.status_code == status
    assert "error" in response.get_json()
    assert publishing_app.extensions["feed"].last_id == 0


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1]", b'{"something": 1}'] + [f'{{"{VALUE}": {bad}}}'.encode() for bad in
     ['"1"', "true", "NaN", "Infinity", "null", "1e999"]],
)  # fmt: skip
def test_publish_refuses_a_body_without_a_finite_number(publishing_app, body):
    headers = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
    response = publishing_app.test_client().post("/publish", data=body, headers=headers)
    assert response.status_code == 400
    assert response.get_json() == {"error": f'Send a JSON object {{"{VALUE}": <a finite number>}}.'}
    assert publishing_app.extensions["feed"].last_id == 0


def test_a_published_number_takes_the_next_id_and_reaches_live_clients(publishing_app):
    feed = publishing_app.extensions["feed"]
    socketio_client = socketio.test_client(publishing_app, namespace=NAMESPACE)
    response = publishing_app.test_client().post(
        "/publish", json={VALUE: 2.5}, headers={"Authorization": "Bearer secret"}
    )
    assert response.status_code == 200
    message = response.get_json()
    assert (message[VALUE], message["id"], message["stream"]) == (2.5, 1, feed.stream_id)
    assert list(feed.history) == [message]
    assert [packet["args"][0] for packet in socketio_client.get_received(NAMESPACE)] == [message]
    socketio_client.disconnect(NAMESPACE)
