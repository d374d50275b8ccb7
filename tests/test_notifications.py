"""Notifications for one person (extras/notifications.py): sign-in, the private channel on Socket.IO
and Server-Sent Events, notify_me, /publish to a user, the gap signal, Redis, and the page.

The handler tests come first (Flask's test client signed in, passed to Flask-SocketIO's); then the
real server with real clients; then Redis and a second process; then two users in Chromium.
"""
import json
import subprocess
import sys
import threading

import pytest
import requests
import socketio as socketio_package

import settings
from application import create_app, socketio
from extras import notifications as notifications_extra
from live import PROJECT, BrowserTab, browser, live_server, redis_url  # noqa: F401  (fixtures)
from protocol import EVENT, GAP_EVENT, NAMESPACE, NOTIFICATION_EVENT, NOTIFY_EVENT, VALUE
from support import disconnect_all, wait_until

TOKEN = "test-token"

# Resume data for the notifications that is not usable: each must mean "send them all", never an error.
WRONG_NOTIFICATION_RESUME = [
    {"last_notification_id": "1"},
    {"last_notification_id": -1},
    {"last_notification_id": 1.5},
    {"last_notification_id": 10**30},
    {"last_notification_id": [1]},
    {"last_notification_id": None},
    {"last_notification_id": True},
    {"last_notification_id": 4},  # not reached yet
    {"last_notification_id": 1, "notification_stream": "another-stream"},
    {"last_notification_id": 1, "notification_stream": None},
    "not a mapping",
    None,
]
BAD_NAMES = ["", "a" * 33, "al ice", "<b>", "alicé", "alice\n", "a/b", "a:b"]
BAD_TEXTS = ["", "x" * 281, None, 42, ["text"], {"text": "x"}, True]


@pytest.fixture
def app():
    app = create_app({"TESTING": True, "SECRET_KEY": "test", "INTERVAL": 3600.0, "PUBLISH_TOKEN": TOKEN})
    yield app
    app.extensions["feed"].stop()


@pytest.fixture
def feed(app):
    return app.extensions["feed"]


@pytest.fixture
def notifications(app):
    return app.extensions["notifications"]


@pytest.fixture
def connect(app):
    """Connect Flask-SocketIO test clients, signed in as ``user`` (None: anonymous); disconnect them after."""
    clients = []

    def connect(user=None, auth=None):
        http = app.test_client()
        if user is not None:
            response = http.post("/login", data={"name": user})
            assert response.status_code == 303, response.data
        test_client = socketio.test_client(app, namespace=NAMESPACE, flask_test_client=http, auth=auth)
        assert test_client.is_connected(NAMESPACE)
        clients.append(test_client)
        return test_client

    yield connect
    for test_client in clients:
        if test_client.is_connected(NAMESPACE):
            test_client.disconnect(NAMESPACE)


def received(test_client, name=NOTIFICATION_EVENT):
    """The arguments of the events ``name`` a test client received since last asked (other events are dropped)."""
    return [packet["args"][0] for packet in test_client.get_received(NAMESPACE) if packet["name"] == name]


def events(test_client):
    return [(packet["name"], packet["args"][0]) for packet in test_client.get_received(NAMESPACE)]


def refusals(caplog):
    return [record for record in caplog.records if record.name == "extras.notifications"]


# Sign-in.


def test_sign_in_sets_an_http_only_same_site_lax_session_cookie(app):
    response = app.test_client().post("/login", data={"name": "alice"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_sign_in_returns_to_the_page_over_the_same_transport(app):
    response = app.test_client().post("/login", data={"name": "alice", "transport": "sse"})
    assert response.headers["Location"] == "/?transport=sse"
    response = app.test_client().post("/login", data={"name": "alice", "transport": "javascript:x"})
    assert response.headers["Location"] == "/"


@pytest.mark.parametrize("name", BAD_NAMES + [None], ids=repr)
def test_sign_in_refuses_a_bad_name_with_one_line(app, name, caplog):
    http = app.test_client()
    response = http.post("/login", data={} if name is None else {"name": name})
    assert response.status_code == 400
    assert [record.getMessage().startswith("Refused a sign-in") for record in refusals(caplog)] == [True]
    assert "Signed in as" not in http.get("/").text


@pytest.mark.parametrize("path", ["/login", "/logout"])
@pytest.mark.parametrize(
    "headers",
    [{"Origin": "https://evil.example"}, {"Origin": "null"}, {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
     {"Origin": "http://localhost.evil.example"}],
    ids=repr,
)  # fmt: skip
def test_a_cross_site_post_is_refused_with_one_line(app, path, headers, caplog):
    http = app.test_client()
    http.post("/login", data={"name": "alice"})
    response = http.post(path, data={"name": "mallory"}, headers=headers)
    assert response.status_code == 403
    assert [record.getMessage().startswith(f"Refused a cross-site POST to {path}") for record in refusals(caplog)] == [True]
    assert "Signed in as <strong id=\"user-name\">alice</strong>" in http.get("/").text  # neither signed out nor in as mallory


@pytest.mark.parametrize(
    "headers",
    [{}, {"Origin": "http://localhost"}, {"Origin": "null", "Sec-Fetch-Site": "same-origin"}],
    ids=["no origin (not a browser)", "same origin", "the page's own form under Referrer-Policy: no-referrer"],
)
def test_a_same_site_post_signs_in_and_out(app, headers):
    http = app.test_client()
    assert http.post("/login", data={"name": "alice"}, headers=headers).status_code == 303
    assert 'Signed in as <strong id="user-name">alice</strong>' in http.get("/").text
    assert http.post("/logout", headers=headers).status_code == 303
    page = http.get("/").text
    assert 'id="sign-in"' in page and "Signed in as" not in page


def test_the_page_shows_the_panel_and_the_forms(app):
    http = app.test_client()
    page = http.get("/")
    assert 'id="sign-in"' in page.text and 'id="inbox"' not in page.text
    assert "form-action 'self'" in page.headers["Content-Security-Policy"]
    http.post("/login", data={"name": "alice"})
    page = http.get("/").text
    assert 'id="inbox"' in page and 'id="notify-me"' in page and 'id="sign-out"' in page
    sse_page = http.get("/?transport=sse").text
    assert 'id="inbox"' in sse_page and 'id="notify-me"' not in sse_page  # notify_me is a Socket.IO event


# The private channel over Socket.IO.


def test_a_signed_in_client_gets_its_history_then_each_new_one_and_only_its_own(notifications, connect):
    for number in range(3):
        notifications.notify("alice", f"for alice {number}")
    notifications.notify("bob", "for bob")
    alice = connect("alice")
    bob = connect("bob")
    anonymous = connect()
    assert [message["text"] for message in received(alice)] == ["for alice 0", "for alice 1", "for alice 2"]
    assert [message["id"] for message in received(bob)] == [1]
    notifications.notify("alice", "new")
    (message,) = received(alice)
    assert set(message) == {"text", "id", "time", "stream"}
    assert (message["text"], message["id"]) == ("new", 4) and isinstance(message["time"], float)
    assert received(bob) == []
    assert events(anonymous) == []


def test_an_anonymous_client_gets_the_numbers_exactly_as_before(feed, notifications, connect):
    feed.publish(1.0)
    notifications.notify("alice", "private")
    anonymous = connect()
    feed.publish(2.0)
    assert [(name, message["id"]) for name, message in events(anonymous)] == [(EVENT, 1), (EVENT, 2)]


def test_a_forged_session_cookie_gets_no_private_channel(app, notifications):
    notifications.notify("alice", "private")
    http = app.test_client()
    signed_in_elsewhere = create_app({"TESTING": True, "SECRET_KEY": "another key", "INTERVAL": 3600.0})
    forger = signed_in_elsewhere.test_client()
    forger.post("/login", data={"name": "alice"})
    http.set_cookie("session", forger.get_cookie("session").value)
    test_client = socketio.test_client(app, namespace=NAMESPACE, flask_test_client=http)
    try:
        assert test_client.is_connected(NAMESPACE)
        notifications.notify("alice", "more")
        assert events(test_client) == []
        assert http.get("/notifications/stream").status_code == 401
        assert http.post("/login", data={"name": "x"}).status_code == 303  # the app still works for it
    finally:
        test_client.disconnect(NAMESPACE)
        signed_in_elsewhere.extensions["feed"].stop()


def test_signing_out_ends_the_private_channel_for_new_connections(app, notifications):
    http = app.test_client()
    http.post("/login", data={"name": "alice"})
    http.post("/logout")
    notifications.notify("alice", "private")
    test_client = socketio.test_client(app, namespace=NAMESPACE, flask_test_client=http)
    try:
        assert received(test_client) == []
    finally:
        test_client.disconnect(NAMESPACE)


def test_ids_and_histories_are_per_user_and_capped_at_history_size(notifications, connect):
    for number in range(15):
        notifications.notify("alice", str(number))
    notifications.notify("bob", "one")
    assert [message["id"] for message in received(connect("alice"))] == list(range(6, 16))
    assert [message["id"] for message in received(connect("bob"))] == [1]
    assert len(notifications.inboxes.get("alice").history) == 10


def test_resume_gets_only_the_notifications_after_the_last_id_seen(notifications, connect):
    for number in range(5):
        notifications.notify("alice", str(number))
    stream = notifications.inboxes.get("alice").stream
    test_client = connect("alice", auth={"last_notification_id": 3, "notification_stream": stream})
    assert [message["id"] for message in received(test_client)] == [4, 5]
    # The issue's own form, without the notification stream.
    test_client = connect("alice", auth={"last_id": 0, "stream": "x", "last_notification_id": 5})
    assert received(test_client) == []


@pytest.mark.parametrize("auth", WRONG_NOTIFICATION_RESUME, ids=repr)
def test_bad_notification_resume_data_means_the_whole_history(notifications, connect, auth):
    for number in range(3):
        notifications.notify("alice", str(number))
    test_client = connect("alice", auth=auth)
    assert [(name, message["id"]) for name, message in events(test_client)] == [(NOTIFICATION_EVENT, n) for n in (1, 2, 3)]


def test_the_gap_signal_on_the_notifications_channel(notifications, connect):
    for number in range(14):
        notifications.notify("alice", str(number))
    stream = notifications.inboxes.get("alice").stream
    test_client = connect("alice", auth={"last_notification_id": 2, "notification_stream": stream})
    got = events(test_client)
    assert got[0] == (GAP_EVENT, {"channel": "notifications", "after": 2, "before": 5})
    assert [message["id"] for _, message in got[1:]] == list(range(5, 15))
    # Resuming from just before the oldest kept: nothing was missed, no gap.
    test_client = connect("alice", auth={"last_notification_id": 4, "notification_stream": stream})
    assert [name for name, _ in events(test_client)] == [NOTIFICATION_EVENT] * 10


def test_the_gap_signal_on_the_numbers_channel(feed, connect):
    for number in range(14):
        feed.publish(float(number))
    test_client = connect(auth={"last_id": 1, "stream": feed.stream_id})
    got = events(test_client)
    assert got[0] == (GAP_EVENT, {"channel": "numbers", "after": 1, "before": 5})
    assert [message["id"] for _, message in got[1:]] == list(range(5, 15))
    assert [name for name, _ in events(connect(auth={"last_id": 4, "stream": feed.stream_id}))] == [EVENT] * 10
    assert [name for name, _ in events(connect(auth={"last_id": 1, "stream": "another"}))] == [EVENT] * 10


def test_both_gaps_come_before_their_histories(feed, notifications, connect):
    for number in range(12):
        feed.publish(float(number))
        notifications.notify("alice", str(number))
    auth = {"last_id": 0, "stream": feed.stream_id, "last_notification_id": 0}
    names = [name for name, _ in events(connect("alice", auth=auth))]
    assert names == [GAP_EVENT] + [EVENT] * 10 + [GAP_EVENT] + [NOTIFICATION_EVENT] * 10


# notify_me.


def test_notify_me_is_acknowledged_with_the_id_and_reaches_every_tab_of_the_user(connect):
    first, second, bob = connect("alice"), connect("alice"), connect("bob")
    assert first.emit(NOTIFY_EVENT, {"text": "hello <b>"}, namespace=NAMESPACE, callback=True) == {"id": 1}
    assert [message["text"] for message in received(first)] == ["hello <b>"]
    assert [message["text"] for message in received(second)] == ["hello <b>"]
    assert events(bob) == []


@pytest.mark.parametrize("text", BAD_TEXTS, ids=repr)
def test_notify_me_refuses_a_bad_text(connect, text, caplog):
    alice, bob = connect("alice"), connect("bob")
    answer = alice.emit(NOTIFY_EVENT, {"text": text}, namespace=NAMESPACE, callback=True)
    assert answer == {"error": "The text must be a string of 1 to 280 characters."}
    assert events(alice) == [] and events(bob) == []
    assert [record.getMessage() for record in refusals(caplog)] == [f"Refused a notify_me from alice: {answer['error']}"]


@pytest.mark.parametrize("data", [None, "text", ["text"], 42], ids=repr)
def test_notify_me_refuses_data_that_is_not_an_object(connect, data, caplog):
    alice = connect("alice")
    answer = alice.emit(NOTIFY_EVENT, data, namespace=NAMESPACE, callback=True)
    assert "error" in answer and events(alice) == []
    assert len(refusals(caplog)) == 1


def test_notify_me_refuses_an_anonymous_client(feed, connect, caplog):
    anonymous, alice = connect(), connect("alice")
    answer = anonymous.emit(NOTIFY_EVENT, {"text": "hi"}, namespace=NAMESPACE, callback=True)
    assert answer == {"error": "Sign in first."}
    assert events(anonymous) == [] and events(alice) == []
    assert [record.getMessage() for record in refusals(caplog)] == ["Refused a notify_me from anonymous: Sign in first."]
    feed.publish(1.0)
    assert [name for name, _ in events(anonymous)] == [EVENT]  # the numbers go on


def test_notify_me_allows_5_in_10_seconds_per_user(connect, notifications, caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(notifications_extra.time, "monotonic", lambda: clock[0])
    alice, bob = connect("alice"), connect("bob")
    answers = [alice.emit(NOTIFY_EVENT, {"text": str(n)}, namespace=NAMESPACE, callback=True) for n in range(6)]
    assert answers[:5] == [{"id": n} for n in range(1, 6)]
    assert answers[5] == {"error": "At most 5 notifications in 10 seconds."}
    assert len(received(alice)) == 5
    assert bob.emit(NOTIFY_EVENT, {"text": "b"}, namespace=NAMESPACE, callback=True) == {"id": 1}  # per user
    clock[0] += 9.9
    assert "error" in alice.emit(NOTIFY_EVENT, {"text": "x"}, namespace=NAMESPACE, callback=True)
    clock[0] += 0.2  # 10.1 s after the first
    assert alice.emit(NOTIFY_EVENT, {"text": "x"}, namespace=NAMESPACE, callback=True) == {"id": 6}
    assert len(refusals(caplog)) == 2


# POST /publish to a user.


def publish(http, body, token=TOKEN):
    return http.post("/publish", json=body, headers={"Authorization": f"Bearer {token}"} if token else {})


def test_publish_to_a_user_answers_with_the_notification(app, connect):
    alice, bob = connect("alice"), connect("bob")
    response = publish(app.test_client(), {"user": "alice", "text": "from a program"})
    assert response.status_code == 200
    assert response.json["text"] == "from a program" and response.json["id"] == 1
    assert received(alice) == [response.json]
    assert events(bob) == []


@pytest.mark.parametrize(
    "body, error",
    [({"user": name, "text": "x"}, "user") for name in BAD_NAMES + [None, 7]]
    + [({"user": "alice", "text": text}, "text") for text in BAD_TEXTS]
    + [({"user": "alice"}, "text")],
    ids=repr,
)
def test_publish_refuses_a_bad_user_or_text_with_one_line(app, connect, feed, body, error, caplog):
    alice, anonymous = connect("alice"), connect()
    response = publish(app.test_client(), body)
    assert response.status_code == 400
    assert error in response.json["error"].lower()
    assert events(alice) == []
    assert len(refusals(caplog)) == 1
    feed.publish(1.0)
    assert [name for name, _ in events(anonymous)] == [EVENT]


def test_publish_to_a_user_needs_the_token(app, connect):
    alice = connect("alice")
    assert publish(app.test_client(), {"user": "alice", "text": "x"}, token=None).status_code == 401
    assert publish(app.test_client(), {"user": "alice", "text": "x"}, token="wrong").status_code == 403
    assert events(alice) == []


def test_publish_of_numbers_still_works_with_and_without_notifications(app):
    assert publish(app.test_client(), {VALUE: 4.2}).json[VALUE] == 4.2
    extras = [extra for extra in __import__("application").EXTRAS if extra != "extras.notifications"]
    alone = create_app({"TESTING": True, "INTERVAL": 3600.0, "PUBLISH_TOKEN": TOKEN}, extras=extras)
    try:
        http = alone.test_client()
        assert publish(http, {VALUE: 4.2}).json[VALUE] == 4.2
        assert publish(http, {"user": "alice", "text": "x"}).status_code == 400  # not a number: as before
        assert http.post("/login", data={"name": "alice"}).status_code == 404
        assert 'id="notifications"' not in http.get("/").text
    finally:
        alone.extensions["feed"].stop()


# Server-Sent Events and the command line, without a server.


def test_notifications_stream_needs_a_signed_in_user(app, caplog):
    response = app.test_client().get("/notifications/stream")
    assert response.status_code == 401
    assert [record.getMessage() for record in refusals(caplog)] == [
        "Refused /notifications/stream to a client that is not signed in"
    ]


def test_the_notify_command_needs_a_message_queue(app):
    result = app.test_cli_runner().invoke(args=["notify", "alice", "hi"])
    assert result.exit_code == 2 and "set MESSAGE_QUEUE" in result.output


def test_notify_from_a_worker_needs_a_message_queue_and_good_input(monkeypatch):
    monkeypatch.setattr(notifications_extra, "_worker_store", None)
    monkeypatch.delenv("MESSAGE_QUEUE", raising=False)
    with pytest.raises(ValueError):
        notifications_extra.notify("not a name", "x")
    with pytest.raises(ValueError):
        notifications_extra.notify("alice", "")
    with pytest.raises(settings.SettingError):
        notifications_extra.notify("alice", "x")


# Bounded memory.


def test_a_user_inactive_for_notification_ttl_is_forgotten():
    clock = [0.0]
    inboxes = notifications_extra.Inboxes(history_size=3, ttl=60.0, clock=lambda: clock[0])
    first = inboxes.open("alice")
    for user in ("bob", "carol"):
        inboxes.open(user)
        clock[0] += 20
    inboxes.open("alice")  # active again: moves to the back
    clock[0] = 70.0  # bob (at 0) is out; carol (at 20) and alice (at 40) are in
    assert inboxes.get("bob") is None
    assert inboxes.get("alice") is first and len(inboxes) == 2
    clock[0] = 200.0
    assert inboxes.get("alice") is None and len(inboxes) == 0
    assert inboxes.open("alice").stream != first.stream  # the ids begin again, in another stream


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
def test_a_bad_notification_ttl_is_refused_with_one_line(value):
    with pytest.raises(settings.SettingError) as refused:
        settings.load({"NOTIFICATION_TTL": value})
    assert str(refused.value).startswith(f"NOTIFICATION_TTL={value!r} cannot be used")


# The real server, real clients.

SECRET = "a secret shared by the processes"


def sign_in(url, name):
    """Sign in over HTTP; return the session cookie's value."""
    http = requests.Session()
    response = http.post(url + "/login", data={"name": name}, allow_redirects=False, timeout=10)
    assert response.status_code == 303, response.text
    return http.cookies["session"]


class Client:
    """A python-socketio client on /test with a session cookie (or none) that keeps every event it receives."""

    def __init__(self, url, cookie=None, auth=None):
        self.events = []
        self.lock = threading.Lock()
        self.client = socketio_package.Client(reconnection=False)
        for name in (EVENT, NOTIFICATION_EVENT, GAP_EVENT):
            self.client.on(name, lambda data, name=name: self._add(name, data), namespace=NAMESPACE)
        headers = {"Cookie": f"session={cookie}"} if cookie else {}
        self.client.connect(
            url, namespaces=[NAMESPACE], transports=["websocket"], headers=headers, auth=auth, wait_timeout=10
        )

    def _add(self, name, data):
        with self.lock:
            self.events.append((name, data))

    def of(self, name):
        """The events ``name`` received so far, in id order (handlers run in threads of their own)."""
        with self.lock:
            return sorted((data for got, data in self.events if got == name), key=lambda data: data.get("id", 0))

    def texts(self):
        return [message["text"] for message in self.of(NOTIFICATION_EVENT)]

    def ids(self, name=NOTIFICATION_EVENT):
        return [message["id"] for message in self.of(name)]

    def notify_me(self, data):
        return self.client.call(NOTIFY_EVENT, data, namespace=NAMESPACE, timeout=10)

    def disconnect(self):
        self.client.disconnect()


@pytest.fixture
def clients():
    """Open Clients (call it like Client); close them all after the test."""
    opened = []

    def open_client(*args, **kwargs):
        opened.append(Client(*args, **kwargs))
        return opened[-1]

    yield open_client
    disconnect_all(opened)


def publish_live(url, body, token=TOKEN):
    return requests.post(url + "/publish", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def read_sse(url, cookie=None, last_event_id=None, count=1, timeout=15):
    """Open /notifications/stream; return its status and the first ``count`` events as (event, id, data)."""
    headers = {"Cookie": f"session={cookie}"} if cookie else {}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    with requests.get(url + "/notifications/stream", headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code != 200:
            return response.status_code, []
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        found, fields = [], {}
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith(("event: ", "id: ", "data: ")):
                key, _, value = line.partition(": ")
                fields[key] = value
            elif line == "" and "data" in fields:
                found.append((fields.get("event"), fields.get("id"), json.loads(fields["data"])))
                fields = {}
                if len(found) == count:
                    return 200, found
    raise AssertionError(f"the stream ended after {found}")


def test_live_each_user_gets_only_their_own_on_both_transports_and_all_the_same_numbers(live_server, clients):
    server = live_server(INTERVAL=0.1, SECRET_KEY=SECRET, PUBLISH_TOKEN=TOKEN)
    alice_cookie, bob_cookie = sign_in(server.url, "alice"), sign_in(server.url, "bob")
    alice, bob, anonymous = clients(server.url, alice_cookie), clients(server.url, bob_cookie), clients(server.url)
    for number in range(3):
        assert publish_live(server.url, {"user": "alice", "text": f"alice {number}"}).status_code == 200
    assert publish_live(server.url, {"user": "bob", "text": "bob 0"}).json()["id"] == 1
    wait_until(lambda: len(alice.texts()) == 3 and len(bob.texts()) == 1, message="the notifications")
    assert alice.texts() == ["alice 0", "alice 1", "alice 2"] and alice.ids() == [1, 2, 3]
    assert bob.texts() == ["bob 0"]
    # Everyone hears the same numbers.
    wait_until(lambda: min(len(client.ids(EVENT)) for client in (alice, bob, anonymous)) >= 5, message="numbers")
    last = min(client.ids(EVENT)[-1] for client in (alice, bob, anonymous))
    common = [[m for m in client.of(EVENT) if m["id"] <= last][-3:] for client in (alice, bob, anonymous)]
    assert common[0] == common[1] == common[2]
    # The event stream with alice's cookie carries alice's only.
    status, found = read_sse(server.url, alice_cookie, count=3)
    assert status == 200
    assert [(event, event_id, data["text"]) for event, event_id, data in found] == [
        (NOTIFICATION_EVENT, str(n + 1), f"alice {n}") for n in range(3)
    ]
    assert anonymous.of(NOTIFICATION_EVENT) == [] and bob.texts() == ["bob 0"]


def test_live_no_or_a_forged_session_cookie_gets_no_private_channel(live_server, clients):
    server = live_server(SECRET_KEY=SECRET, PUBLISH_TOKEN=TOKEN)
    other = live_server(SECRET_KEY="another secret")
    forged = sign_in(other.url, "alice")  # a well-formed cookie, signed with another key
    tampered = sign_in(server.url, "bob")[:-3] + "xyz"
    assert read_sse(server.url)[0] == 401
    assert read_sse(server.url, forged)[0] == 401
    assert read_sse(server.url, tampered)[0] == 401
    spies = [clients(server.url, forged), clients(server.url, tampered)]
    publish_live(server.url, {"user": "alice", "text": "private"})
    publish_live(server.url, {"user": "bob", "text": "private"})
    alice = clients(server.url, sign_in(server.url, "alice"))
    wait_until(lambda: alice.texts() == ["private"], message="alice's notification")
    assert all(spy.of(NOTIFICATION_EVENT) == [] and spy.client.connected for spy in spies)
    assert "Refused /notifications/stream to a client that is not signed in" in server.log()


def test_live_resume_without_duplicates_and_the_gap_signal(live_server, clients):
    server = live_server(SECRET_KEY=SECRET, PUBLISH_TOKEN=TOKEN, HISTORY_SIZE=3)
    cookie = sign_in(server.url, "alice")
    for number in range(2):
        publish_live(server.url, {"user": "alice", "text": str(number)})
    first = clients(server.url, cookie)
    wait_until(lambda: first.ids() == [1, 2], message="the history")
    stream = first.of(NOTIFICATION_EVENT)[-1]["stream"]
    first.disconnect()
    publish_live(server.url, {"user": "alice", "text": "2"})
    resumed = clients(server.url, cookie, auth={"last_notification_id": 2, "notification_stream": stream})
    publish_live(server.url, {"user": "alice", "text": "3"})
    wait_until(lambda: resumed.ids() == [3, 4], message="ids 3 and 4")
    assert resumed.of(GAP_EVENT) == []
    # Over Server-Sent Events: Last-Event-ID 3 gets 4 and what follows.
    assert [event_id for _, event_id, _ in read_sse(server.url, cookie, last_event_id=3)[1]] == ["4"]
    # From id 1, with ids 2..4 kept: nothing lost. From 0: id 1 is gone for good.
    assert clients(server.url, cookie, auth={"last_notification_id": 1, "notification_stream": stream}).of(GAP_EVENT) == []
    late = clients(server.url, cookie, auth={"last_notification_id": 0, "notification_stream": stream})
    wait_until(lambda: late.ids() == [2, 3, 4], message="the history after the gap")
    assert late.of(GAP_EVENT) == [{"channel": "notifications", "after": 0, "before": 2}]
    _, found = read_sse(server.url, cookie, last_event_id=0, count=2)
    assert found[0] == (GAP_EVENT, None, {"channel": "notifications", "after": 0, "before": 2})
    assert found[1][1] == "2"


def test_live_bad_input_is_refused_and_the_stream_goes_on_for_everyone(live_server, clients):
    server = live_server(INTERVAL=0.1, SECRET_KEY=SECRET, PUBLISH_TOKEN=TOKEN)
    alice = clients(server.url, sign_in(server.url, "alice"))
    bob = clients(server.url, sign_in(server.url, "bob"))
    anonymous = clients(server.url)
    for data in [{"text": ""}, {"text": "x" * 281}, {"text": 5}, {"nothing": 1}, "text", None]:
        assert "error" in alice.notify_me(data)
    assert anonymous.notify_me({"text": "hi"}) == {"error": "Sign in first."}
    answers = [alice.notify_me({"text": str(n)}) for n in range(6)]
    assert answers[:5] == [{"id": n} for n in range(1, 6)] and "error" in answers[5]
    for body in [{"user": "a b", "text": "x"}, {"user": "alice", "text": ""}, {"user": "alice", "text": ["x"]}]:
        assert publish_live(server.url, body).status_code == 400
    assert requests.post(server.url + "/login", data={"name": "<script>"}, timeout=10).status_code == 400
    evil = {"Origin": "https://evil.example"}
    assert requests.post(server.url + "/login", data={"name": "eve"}, headers=evil, timeout=10).status_code == 403
    wait_until(lambda: len(alice.texts()) == 5, message="alice's five notifications")
    before = [client.ids(EVENT)[-1] for client in (alice, bob, anonymous)]
    wait_until(
        lambda: all(client.ids(EVENT)[-1] >= seen + 3 for client, seen in zip((alice, bob, anonymous), before)),
        message="the numbers to go on for everyone",
    )
    assert alice.texts() == [str(n) for n in range(5)]
    assert bob.of(NOTIFICATION_EVENT) == [] and anonymous.of(NOTIFICATION_EVENT) == []
    log = server.log()
    assert log.count("Refused a notify_me from alice") == 7 and log.count("Refused a notify_me from anonymous") == 1
    assert "Traceback" not in log


# Several processes through Redis.


def test_a_notification_from_anywhere_reaches_every_tab_on_every_process_once(live_server, redis_url, clients):
    env = {"MESSAGE_QUEUE": redis_url, "SECRET_KEY": SECRET, "PUBLISH_TOKEN": TOKEN, "NOTIFICATION_TTL": 600}
    server_a, server_b = live_server(**env), live_server(**env)
    alice_cookie = sign_in(server_a.url, "alice")  # one key: a session of A is good on B
    tabs = [clients(server_a.url, alice_cookie), clients(server_a.url, alice_cookie), clients(server_b.url, alice_cookie)]
    bob = clients(server_b.url, sign_in(server_b.url, "bob"))
    worker_env = {"MESSAGE_QUEUE": redis_url, "NOTIFICATION_TTL": "600", "PATH": "/usr/bin:/bin"}
    worker = subprocess.run(
        [sys.executable, "-c", "from extras.notifications import notify; print(notify('alice', 'from a worker'))"],
        cwd=PROJECT, env=worker_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    command = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "application", "notify", "alice", "from the command line"],
        cwd=PROJECT, env={**worker_env, "SECRET_KEY": SECRET}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert command.returncode == 0, command.stderr
    assert json.loads(command.stdout.strip().splitlines()[-1])["id"] == 2
    assert publish_live(server_b.url, {"user": "alice", "text": "from B"}).json()["id"] == 3
    assert tabs[0].notify_me({"text": "from a tab on A"}) == {"id": 4}
    expected = ["from a worker", "from the command line", "from B", "from a tab on A"]
    wait_until(lambda: all(len(tab.texts()) >= 4 for tab in tabs), timeout=15, message="four at every tab")
    assert all(tab.texts() == expected and tab.ids() == [1, 2, 3, 4] for tab in tabs)
    assert len({tab.of(NOTIFICATION_EVENT)[0]["stream"] for tab in tabs}) == 1
    # A tab that opens later on either process gets the history from Redis, and resumes there.
    stream = tabs[0].of(NOTIFICATION_EVENT)[0]["stream"]
    late = clients(server_b.url, alice_cookie, auth={"last_notification_id": 2, "notification_stream": stream})
    wait_until(lambda: late.ids() == [3, 4], message="the resumed history")
    assert bob.of(NOTIFICATION_EVENT) == []
    # Forgotten after NOTIFICATION_TTL: Redis expires the user's keys.
    store = notifications_extra.RedisNotifications(redis_url, 10, 600)
    try:
        keys = sorted(key.decode() for key in store.redis.keys("notifications:*"))
        assert keys == ["notifications:history:alice", "notifications:user:alice"]
        assert all(0 < store.redis.ttl(key) <= 600 for key in keys)
        assert len(store.history("alice")) == 4
    finally:
        store.redis.close()


# The page: two users in two browser contexts.

INBOX = "Array.from(document.querySelectorAll('#inbox li'), li => [Number(li.dataset.id), li.querySelector('.text').textContent])"
NUMBERS = "Array.from(document.querySelectorAll('#numbers li'), li => [Number(li.dataset.id), li.textContent])"
# Keep the page's Socket.IO client in window.pageSocket, so that a test can drop and resume its connection.
CAPTURE_SOCKET = """
Object.defineProperty(window, 'io', {
  configurable: true,
  get: function () { return window.wrappedIo; },
  set: function (io) {
    window.wrappedIo = function () { window.pageSocket = io.apply(this, arguments); return window.pageSocket; };
  },
});
"""


@pytest.fixture
def signed_in_tab(browser):
    """Open a tab in a fresh browser context (a person of their own) and sign in on the page; close all after."""


    contexts = []

    def open_signed_in(url, name, path="/", init_script=None):
        context = browser.new_context()
        contexts.append(context)
        tab = BrowserTab(context.new_page())
        if init_script:
            tab.page.add_init_script(init_script)
        tab.page.goto(url + path)
        tab.page.fill("#sign-in input[name=name]", name)
        tab.page.click("#sign-in button")
        tab.page.wait_for_selector("#user-name")
        assert tab.page.text_content("#user-name") == name
        wait_until(lambda: tab.page.get_attribute("#state", "data-state") == "live", message="the page to be live")
        return tab

    yield open_signed_in
    for context in contexts:
        context.close()


def inbox(tab):
    return [tuple(item) for item in tab.page.evaluate(INBOX)]


def test_page_two_users_see_only_their_own_notifications_and_the_same_numbers(live_server, signed_in_tab):
    server = live_server(INTERVAL=0.2, SECRET_KEY=SECRET, PUBLISH_TOKEN=TOKEN)
    alice, bob = signed_in_tab(server.url, "alice"), signed_in_tab(server.url, "bob")
    assert alice.page.url == server.url + "/"
    markup = '<img src=x onerror="window.injected = true">'
    alice.page.fill("#notify-me input[name=text]", markup)
    alice.page.click("#notify-me button")
    wait_until(lambda: alice.page.text_content("#notify-result") == "Sent as #1.", message="the acknowledgement")
    wait_until(lambda: inbox(alice) == [(1, markup)], message="alice's notification in her panel")
    assert alice.page.evaluate("document.querySelector('#inbox img') === null && window.injected === undefined")
    assert publish_live(server.url, {"user": "bob", "text": "for bob"}).status_code == 200
    assert publish_live(server.url, {"user": "alice", "text": "for alice"}).status_code == 200
    wait_until(lambda: inbox(bob) == [(1, "for bob")], message="bob's notification in his panel")
    wait_until(lambda: inbox(alice) == [(2, "for alice"), (1, markup)], message="newest first")
    assert inbox(bob) == [(1, "for bob")]
    # Each item shows its time.
    assert alice.page.evaluate("document.querySelector('#inbox li time').getAttribute('datetime')").endswith("Z")
    # A refused notify_me shows the error and sends nothing.
    alice.page.evaluate("document.querySelector('#notify-me input').removeAttribute('maxlength')")
    alice.page.fill("#notify-me input[name=text]", "x" * 281)
    alice.page.click("#notify-me button")
    wait_until(lambda: alice.page.get_attribute("#notify-result", "data-result") == "error", message="the error")
    # Both see the same numbers.
    wait_until(
        lambda: len(alice.page.evaluate(NUMBERS)) == 10 and alice.page.evaluate(NUMBERS) == bob.page.evaluate(NUMBERS),
        message="the same numbers on both pages",
    )
    assert len(inbox(alice)) == 2 and len(inbox(bob)) == 1
    # Signing out removes the panel and the private channel.
    bob.page.click("#sign-out button")
    bob.page.wait_for_selector("#sign-in")
    assert bob.page.query_selector("#inbox") is None
    assert alice.errors == [] and bob.errors == []


def test_page_over_server_sent_events_shows_the_notifications(live_server, signed_in_tab):
    server = live_server(INTERVAL=0.2, SECRET_KEY=SECRET, PUBLISH_TOKEN=TOKEN)
    alice = signed_in_tab(server.url, "alice", path="/?transport=sse")
    bob = signed_in_tab(server.url, "bob", path="/?transport=sse")
    assert alice.page.url == server.url + "/?transport=sse"
    assert alice.page.query_selector("#notify-me") is None
    publish_live(server.url, {"user": "alice", "text": "over SSE"})
    publish_live(server.url, {"user": "bob", "text": "bob's"})
    wait_until(lambda: inbox(alice) == [(1, "over SSE")], message="the notification over SSE")
    wait_until(lambda: inbox(bob) == [(1, "bob's")], message="bob's over SSE")
    assert alice.errors == [] and bob.errors == []


def test_page_says_what_was_missed_on_both_channels(live_server, signed_in_tab):
    server = live_server(INTERVAL=0.1, SECRET_KEY=SECRET, PUBLISH_TOKEN=TOKEN, HISTORY_SIZE=3)
    alice = signed_in_tab(server.url, "alice", init_script=CAPTURE_SOCKET)
    publish_live(server.url, {"user": "alice", "text": "1"})
    wait_until(lambda: inbox(alice) == [(1, "1")], message="the first notification")
    alice.page.evaluate("window.pageSocket.disconnect()")
    wait_until(lambda: alice.page.get_attribute("#state", "data-state") == "reconnecting", message="disconnected")
    top = alice.page.evaluate(NUMBERS)[0][0]
    for number in range(2, 6):
        publish_live(server.url, {"user": "alice", "text": str(number)})
    wait_until(lambda: server.health()["last_id"] >= top + 6, message="numbers the page misses for good")
    alice.page.evaluate("window.pageSocket.connect()")
    wait_until(lambda: alice.page.is_visible("#notifications-missed"), message="the notifications' gap")
    assert alice.page.text_content("#notifications-missed") == (
        "Missed while this page was away: 1 notifications (after #1, before #3)."
    )
    assert alice.page.is_visible("#missed")
    assert alice.page.text_content("#missed").startswith("Missed while this page was away: ")
    assert f"(after #{top}, before #" in alice.page.text_content("#missed")
    wait_until(lambda: [item_id for item_id, _ in inbox(alice)] == [5, 4, 3], message="the kept history")
    assert alice.errors == []
