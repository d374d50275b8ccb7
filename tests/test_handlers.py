"""Handler tests with Flask's and Flask-SocketIO's test clients: no network, no server process.

Copy this file and tests/conftest.py into your CI: they need only the app's requirements and pytest
(``pip install -r requirements.txt pytest && python -m pytest tests/test_handlers.py``).
"""
import logging
import time

import pytest

import application
import settings
from application import create_app, socketio
from protocol import EVENT, NAMESPACE, VALUE

# Resume data a client may send that is not a usable {"last_id": N, "stream": S}:
# each must be treated as absent (the client gets the whole history), never as an error.
WRONG_RESUME_DATA = [
    {"last_id": "3"},
    {"last_id": -1},
    {"last_id": 2.5},
    {"last_id": 10**30},
    {"last_id": [3]},
    {"last_id": {"id": 3}},
    {"last_id": None},
    {"last_id": True},
    {"last_id": 3, "stream": "another-stream"},
    {"last_id": 3, "stream": None},
    {"last_id": 3, "stream": ["not", "a", "stream"]},
    {"something": "else"},
    "not a mapping",
    [1, 2, 3],
    None,
]


def wait_until(condition, timeout=10.0, message="condition"):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {message}"
        time.sleep(0.01)


def received_ids(test_client):
    return [packet["args"][0]["id"] for packet in test_client.get_received(NAMESPACE)]


def assert_consecutive(ids):
    """Each id is one more than the one before: no gap, no duplicate, no reordering."""
    assert ids == list(range(ids[0], ids[0] + len(ids))), ids


def test_index_serves_the_page(client):
    response = client.get("/")
    assert response.status_code == 200
    assert b'id="numbers"' in response.data
    assert b'data-transport="socketio"' in response.data
    assert f'data-namespace="{NAMESPACE}"'.encode() in response.data
    assert f'data-event="{EVENT}"'.encode() in response.data
    assert f'data-value="{VALUE}"'.encode() in response.data
    assert b"vendor/socket.io.min.js" in response.data


def test_index_refuses_an_unknown_transport(client, caplog):
    response = client.get("/?transport=<websocket>")
    assert response.status_code == 400
    assert b"Unknown transport: use one of socketio" in response.data
    assert b"<websocket>" not in response.data  # never echoed into the page
    assert "Refused the page with transport '<websocket>'" in caplog.text


@pytest.mark.parametrize("path", ["vendor/jquery.min.js", "vendor/socket.io.min.js", "app.js", "favicon.svg"])
def test_page_assets_are_served_locally(client, path):
    with client.get(f"/static/{path}") as response:
        assert response.status_code == 200
        assert len(response.data) > 100


def test_healthz_reports_the_stream(client, feed, socketio_client):
    feed.publish(1.5)
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


def test_healthz_answers_503_while_degraded(client, feed):
    feed.health_checks.append(lambda: {"problem": "the source is down"})
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json["status"] == "degraded"
    assert response.json["problem"] == "the source is down"


def test_broadcast_payload(feed, socketio_client):
    feed.publish(application.next_number())
    (packet,) = socketio_client.get_received(NAMESPACE)
    assert packet["name"] == EVENT
    (message,) = packet["args"]
    assert set(message) == {VALUE, "id", "time", "stream"}
    assert isinstance(message[VALUE], float) and 0 <= message[VALUE] < 10
    assert round(message[VALUE], 3) == message[VALUE]
    assert message["id"] == 1
    assert isinstance(message["time"], float)
    assert message["stream"] == feed.stream_id


def test_next_number_stays_in_range():
    numbers = [application.next_number() for _ in range(10_000)]
    assert all(0 <= number < 10 and round(number, 3) == number for number in numbers)


def test_new_client_gets_history_oldest_first(app, feed):
    for number in range(15):
        feed.publish(float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    packets = test_client.get_received(NAMESPACE)
    assert [packet["name"] for packet in packets] == [EVENT] * 10
    assert [packet["args"][0]["id"] for packet in packets] == list(range(6, 16))
    assert [packet["args"][0][VALUE] for packet in packets] == [float(n) for n in range(5, 15)]


def test_history_size_is_configurable():
    app = create_app({"TESTING": True, "INTERVAL": 3600.0, "HISTORY_SIZE": 3})
    feed = app.extensions["feed"]
    for number in range(5):
        feed.publish(float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    assert received_ids(test_client) == [3, 4, 5]
    test_client.disconnect(NAMESPACE)
    feed.stop()


def test_live_broadcasts_follow_the_history(app, feed):
    feed.publish(1.0)
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    feed.publish(2.0)
    feed.publish(3.0)
    assert received_ids(test_client) == [1, 2, 3]


def test_resume_sends_only_what_was_missed(app, feed):
    for number in range(8):
        feed.publish(float(number))
    auth = {"last_id": 5, "stream": feed.stream_id}
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth=auth)
    assert received_ids(test_client) == [6, 7, 8]


def test_resume_without_stream_id(app, feed):
    for number in range(4):
        feed.publish(float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth={"last_id": 2})
    assert received_ids(test_client) == [3, 4]


def test_resume_when_up_to_date_sends_nothing(app, feed):
    for number in range(4):
        feed.publish(float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth={"last_id": 4})
    assert received_ids(test_client) == []


@pytest.mark.parametrize("auth", WRONG_RESUME_DATA, ids=repr)
def test_bad_resume_data_means_full_history(app, feed, auth):
    for number in range(5):
        feed.publish(float(number))
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth=auth)
    assert test_client.is_connected(NAMESPACE)
    assert received_ids(test_client) == [1, 2, 3, 4, 5]


def test_disconnect_is_counted(app, feed):
    first = socketio.test_client(app, namespace=NAMESPACE)
    second = socketio.test_client(app, namespace=NAMESPACE)
    assert feed.listeners == 2
    first.disconnect(NAMESPACE)
    second.disconnect(NAMESPACE)
    assert feed.listeners == 0


@pytest.mark.parametrize("name", ["connect", "disconnect"])
def test_a_client_cannot_send_the_connect_or_disconnect_event(feed, socketio_client, name, caplog):
    # python-socketio would run the handler of that name, counting the client in (or out) again;
    # extras/hardening.py drops them, with one log line.
    for _ in range(3):
        socketio_client.emit(name, {"last_id": 0}, namespace=NAMESPACE)
    assert socketio_client.is_connected(NAMESPACE)
    assert feed.listeners == 1
    dropped = [record.getMessage() for record in caplog.records if "reserved" in record.getMessage()]
    assert len(dropped) == 1 and repr(name) in dropped[0]


def test_a_failing_connect_refuses_the_client_and_keeps_the_count(app, feed, monkeypatch, caplog):
    def broken(auth):
        raise RuntimeError("the history is unreadable")

    monkeypatch.setattr(feed, "missed_since", broken)
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    assert not test_client.is_connected(NAMESPACE)
    assert feed.listeners == 0
    monkeypatch.undo()
    good = socketio.test_client(app, namespace=NAMESPACE)
    assert feed.listeners == 1
    good.disconnect(NAMESPACE)
    assert feed.listeners == 0  # not -1: the refused client was never counted in, nor out
    failures = [record for record in caplog.records if "connect handler failed" in record.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is RuntimeError  # the traceback, once


def test_the_app_works_without_any_extra():
    app = create_app({"TESTING": True, "INTERVAL": 3600.0}, extras=[])
    feed = app.extensions["feed"]
    assert app.test_client().get("/stream").status_code == 404
    assert app.test_client().get("/?transport=sse").status_code == 400
    feed.publish(1.0)
    test_client = socketio.test_client(app, namespace=NAMESPACE, auth={"last_id": 0, "stream": feed.stream_id})
    feed.publish(2.0)
    assert received_ids(test_client) == [1, 2]
    test_client.disconnect(NAMESPACE)
    feed.stop()


@pytest.mark.parametrize(
    "name, value",
    [("INTERVAL", "0"), ("INTERVAL", "-1"), ("INTERVAL", "soon"), ("INTERVAL", "nan"), ("HISTORY_SIZE", "0"),
     ("HISTORY_SIZE", "2.5"), ("GRACE_PERIOD", "-1"), ("ASYNC_MODE", "eventlet"), ("MESSAGE_QUEUE", "localhost"),
     ("ALLOWED_ORIGINS", "example.com"), ("PING_TIMEOUT", "0"), ("MAX_MESSAGE_SIZE", "big")],
)  # fmt: skip
def test_a_bad_setting_is_refused_with_one_line_naming_it(name, value):
    with pytest.raises(settings.SettingError) as refused:
        settings.load({name: value})
    assert str(refused.value).startswith(f"{name}={value!r} cannot be used: it must be ")
    assert "\n" not in str(refused.value)


def test_settings_come_from_the_environment_then_the_test_config():
    loaded = settings.load({"INTERVAL": "0.5", "HISTORY_SIZE": "20"}, {"HISTORY_SIZE": 30, "TESTING": True})
    assert (loaded["INTERVAL"], loaded["HISTORY_SIZE"], loaded["TESTING"]) == (0.5, 30, True)
    assert loaded["GRACE_PERIOD"] == 5.0


# The producer, really running, fast.


@pytest.fixture
def make_fast_app():
    """Create apps whose producer really runs, fast (call it after replacing next_number); stop them after."""
    apps = []

    def make_fast_app():
        apps.append(create_app({"TESTING": True, "INTERVAL": 0.02, "GRACE_PERIOD": 0.1}))
        return apps[-1]

    yield make_fast_app
    for app in apps:
        feed = app.extensions["feed"]
        feed.stop()
        wait_until(lambda: feed.producer is None, message="the producer to stop")


def test_first_client_starts_one_producer(make_fast_app, caplog):
    caplog.set_level(logging.INFO, logger="application")
    app = make_fast_app()
    feed = app.extensions["feed"]
    clients = [socketio.test_client(app, namespace=NAMESPACE) for _ in range(20)]
    wait_until(lambda: feed.last_id >= 5, message="five broadcasts")
    assert caplog.messages.count("Producer started") == 1
    for test_client in clients:
        assert_consecutive(received_ids(test_client))


def test_producer_stops_when_idle_and_restarts(make_fast_app, caplog):
    caplog.set_level(logging.INFO, logger="application")
    app = make_fast_app()
    feed = app.extensions["feed"]
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    wait_until(lambda: feed.last_id >= 3, message="three broadcasts")
    test_client.disconnect(NAMESPACE)
    wait_until(lambda: feed.producer is None, message="the producer to stop")
    assert caplog.messages.count("Producer stopped") == 1
    stopped_at = feed.last_id

    test_client = socketio.test_client(app, namespace=NAMESPACE)
    wait_until(lambda: feed.last_id >= stopped_at + 3, message="broadcasts to start again")
    assert caplog.messages.count("Producer started") == 2
    assert_consecutive(received_ids(test_client))


def test_a_stopped_feed_wakes_its_producer_at_once(app, feed, socketio_client):
    assert feed.producer is not None  # asleep until the next tick, an hour away
    started = time.monotonic()
    feed.stop()
    wait_until(lambda: feed.producer is None, timeout=5, message="the producer to end")
    assert time.monotonic() - started < 5


def test_failing_number_source_is_logged_and_skipped(make_fast_app, monkeypatch, caplog):
    calls = []

    def flaky_number():
        calls.append(None)
        if len(calls) % 2:
            raise RuntimeError("source unavailable")
        return 1.0

    monkeypatch.setattr(application, "next_number", flaky_number)
    app = make_fast_app()
    feed = app.extensions["feed"]
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    wait_until(lambda: feed.last_id >= 5, message="five broadcasts despite failures")
    assert feed.producer is not None
    assert any(m.startswith("next_number() failed: RuntimeError") for m in caplog.messages)
    assert_consecutive(received_ids(test_client))


@pytest.mark.parametrize("removed", application.EXTRAS)
def test_each_extra_can_be_removed(removed):
    """Deleting an extra's line from EXTRAS leaves an app that serves the page and the stream."""
    app = create_app({"TESTING": True, "INTERVAL": 3600.0}, extras=[e for e in application.EXTRAS if e != removed])
    feed = app.extensions["feed"]
    try:
        assert app.test_client().get("/").status_code == 200
        assert app.test_client().get("/healthz").status_code == 200
        feed.publish(1.0)
        test_client = socketio.test_client(app, namespace=NAMESPACE)
        assert received_ids(test_client) == [1]
        test_client.disconnect(NAMESPACE)
    finally:
        feed.stop()
