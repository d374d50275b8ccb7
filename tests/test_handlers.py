"""Handler-level tests with Flask's and Flask-SocketIO's test clients: copy these into your CI."""
import logging

import pytest

import application
from application import broadcast, socketio
from support import EVENT, NAMESPACE, WRONG_RESUME_DATA, assert_consecutive, wait_until


def received_ids(test_client):
    return [packet["args"][0]["id"] for packet in test_client.get_received(NAMESPACE)]


def test_index_serves_the_page(client):
    response = client.get("/")
    assert response.status_code == 200
    assert b'id="numbers"' in response.data
    assert b'data-transport="socketio"' in response.data
    assert b'data-namespace="/test"' in response.data
    assert b"vendor/socket.io.min.js" in response.data


def test_index_over_sse_reads_the_stream_without_the_socketio_client(client):
    response = client.get("/?transport=sse")
    assert response.status_code == 200
    assert b'data-transport="sse"' in response.data
    assert b'data-stream-url="/stream"' in response.data
    assert b"socket.io.min.js" not in response.data


def test_index_refuses_an_unknown_transport(client, caplog):
    response = client.get("/?transport=<websocket>")
    assert response.status_code == 400
    assert b"Unknown transport: use one of socketio, sse." in response.data
    assert b"<websocket>" not in response.data  # never echoed into the page
    assert "Refused the page with transport '<websocket>'" in caplog.text


@pytest.mark.parametrize("path", ["vendor/jquery.min.js", "vendor/socket.io.min.js", "app.js", "favicon.svg"])
def test_page_assets_are_served_locally(client, path):
    with client.get(f"/static/{path}") as response:
        assert response.status_code == 200
        assert len(response.data) > 100


def test_healthz_reports_the_stream(client, feed, socketio_client):
    broadcast(feed, 1.5)
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {
        "status": "ok",
        "problem": None,
        "clients": 1,
        "last_id": 1,
        "stream": feed.stream_id,
        "producer_running": True,
        "last_broadcast_time": feed.history[-1]["time"],
    }


def test_broadcast_payload(feed, socketio_client):
    broadcast(feed, application.next_number())
    (packet,) = socketio_client.get_received(NAMESPACE)
    assert packet["name"] == EVENT
    (message,) = packet["args"]
    assert set(message) == {"number", "id", "time", "stream"}
    assert isinstance(message["number"], float) and 0 <= message["number"] < 10
    assert round(message["number"], 3) == message["number"]
    assert message["id"] == 1
    assert isinstance(message["time"], float)
    assert message["stream"] == feed.stream_id


def test_next_number_stays_in_range():
    numbers = [application.next_number() for _ in range(10_000)]
    assert all(0 <= number < 10 and round(number, 3) == number for number in numbers)


def test_new_client_gets_history_oldest_first(app, feed):
    for number in range(15):
        broadcast(feed, float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    packets = test_client.get_received(NAMESPACE)
    assert [packet["name"] for packet in packets] == [EVENT] * 10
    assert [packet["args"][0]["id"] for packet in packets] == list(range(6, 16))
    assert [packet["args"][0]["number"] for packet in packets] == [float(n) for n in range(5, 15)]


def test_history_size_is_configurable(app, feed):
    app.extensions["number_feed"] = type(feed)(history_size=3)
    feed = app.extensions["number_feed"]
    for number in range(5):
        broadcast(feed, float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    assert received_ids(test_client) == [3, 4, 5]


def test_live_broadcasts_follow_the_history(app, feed):
    broadcast(feed, 1.0)
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    broadcast(feed, 2.0)
    broadcast(feed, 3.0)
    assert received_ids(test_client) == [1, 2, 3]


def test_resume_sends_only_what_was_missed(app, feed):
    for number in range(8):
        broadcast(feed, float(number))
    auth = {"last_id": 5, "stream": feed.stream_id}
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth=auth)
    assert received_ids(test_client) == [6, 7, 8]


def test_resume_without_stream_id(app, feed):
    for number in range(4):
        broadcast(feed, float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth={"last_id": 2})
    assert received_ids(test_client) == [3, 4]


def test_resume_when_up_to_date_sends_nothing(app, feed):
    for number in range(4):
        broadcast(feed, float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth={"last_id": 4})
    assert received_ids(test_client) == []


@pytest.mark.parametrize("auth", WRONG_RESUME_DATA, ids=repr)
def test_bad_resume_data_means_full_history(app, feed, auth):
    for number in range(5):
        broadcast(feed, float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth=auth)
    assert test_client.is_connected(NAMESPACE)
    assert received_ids(test_client) == [1, 2, 3, 4, 5]


def test_disconnect_is_counted(app, feed):
    first = socketio.test_client(app, namespace=NAMESPACE)
    second = socketio.test_client(app, namespace=NAMESPACE)
    assert feed.clients == 2
    first.disconnect(NAMESPACE)
    second.disconnect(NAMESPACE)
    assert feed.clients == 0


@pytest.fixture
def fast_feed_app():
    """An app whose producer really runs, fast."""
    app = application.create_app({"TESTING": True, "SECRET_KEY": "test", "INTERVAL": 0.02, "GRACE_PERIOD": 0.1})
    yield app
    feed = app.extensions["number_feed"]
    feed.stop()
    wait_until(lambda: feed.producer is None, message="the producer to stop")


def test_first_client_starts_one_producer(fast_feed_app, caplog):
    caplog.set_level(logging.INFO, logger="application")
    feed = fast_feed_app.extensions["number_feed"]
    clients = [socketio.test_client(fast_feed_app, namespace=NAMESPACE) for _ in range(20)]
    wait_until(lambda: feed.last_id >= 5, message="five broadcasts")
    assert caplog.messages.count("Producer started") == 1
    for test_client in clients:
        assert_consecutive(received_ids(test_client))


def test_producer_stops_when_idle_and_restarts(fast_feed_app, caplog):
    caplog.set_level(logging.INFO, logger="application")
    feed = fast_feed_app.extensions["number_feed"]
    test_client = socketio.test_client(fast_feed_app, namespace=NAMESPACE)
    wait_until(lambda: feed.last_id >= 3, message="three broadcasts")
    test_client.disconnect(NAMESPACE)
    wait_until(lambda: feed.producer is None, message="the producer to stop")
    assert caplog.messages.count("Producer stopped") == 1
    stopped_at = feed.last_id

    test_client = socketio.test_client(fast_feed_app, namespace=NAMESPACE)
    wait_until(lambda: feed.last_id >= stopped_at + 3, message="broadcasts to start again")
    assert caplog.messages.count("Producer started") == 2
    assert_consecutive(received_ids(test_client))


def test_failing_number_source_is_logged_and_skipped(fast_feed_app, monkeypatch, caplog):
    calls = []

    def flaky_number():
        calls.append(None)
        if len(calls) % 2:
            raise RuntimeError("source unavailable")
        return 1.0

    monkeypatch.setattr(application, "next_number", flaky_number)
    feed = fast_feed_app.extensions["number_feed"]
    test_client = socketio.test_client(fast_feed_app, namespace=NAMESPACE)
    wait_until(lambda: feed.last_id >= 5, message="five broadcasts despite failures")
    assert feed.producer is not None
    assert any(m.startswith("next_number() failed: RuntimeError") for m in caplog.messages)
    assert_consecutive(received_ids(test_client))
