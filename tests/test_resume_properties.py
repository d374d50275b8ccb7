"""Property-based tests of the history and resume logic: whatever the order of broadcasts,
connects, disconnects and resumes, no client sees a duplicate, a reordering, or a gap that
the history window could have filled."""
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from application import create_app, socketio
from protocol import EVENT, NAMESPACE

HISTORY_SIZE = 5
CLIENTS = 3


class Client:
    """One browser tab: its connection, if any, and the ids it has seen in this stream."""

    def __init__(self):
        self.connection = None
        self.ids = []
        self.expected_first = None  # the id its next connection must start with, once it has one


class ResumeMachine(RuleBasedStateMachine):
    """Drive the real handlers with Flask-SocketIO's test client; broadcasts come from the rules."""

    def __init__(self):
        super().__init__()
        self.app = create_app({"TESTING": True, "SECRET_KEY": "test", "HISTORY_SIZE": HISTORY_SIZE})
        self.feed = self.app.extensions["feed"]
        self.feed.stop()  # no producer: the rules decide when a broadcast goes out
        self.clients = [Client() for _ in range(CLIENTS)]

    def oldest_kept(self):
        """The id of the oldest broadcast still in the history (or of the next one if it is empty)."""
        return self.feed.history[0]["id"] if self.feed.history else self.feed.last_id + 1

    @rule(number=st.floats(0, 10))
    def broadcast(self, number):
        self.feed.publish(number)

    @rule(index=st.integers(0, CLIENTS - 1))
    def connect_afresh(self, index):
        client = self.clients[index]
        if client.connection is None:
            client.ids = []  # a new tab: it has seen nothing, and gets the whole history
            client.expected_first = self.oldest_kept()
            client.connection = socketio.test_client(self.app, namespace=NAMESPACE)

    @rule(index=st.integers(0, CLIENTS - 1))
    def disconnect(self, index):
        client = self.clients[index]
        if client.connection is not None:
            client.connection.disconnect(namespace=NAMESPACE)
            client.connection = None

    @precondition(lambda self: any(c.connection is None and c.ids for c in self.clients))
    @rule(index=st.integers(0, CLIENTS - 1))
    def resume(self, index):
        client = self.clients[index]
        if client.connection is None and client.ids:
            # What the window still holds comes without a gap; older broadcasts are gone.
            client.expected_first = max(client.ids[-1] + 1, self.oldest_kept())
            auth = {"last_id": client.ids[-1], "stream": self.feed.stream_id}
            client.connection = socketio.test_client(self.app, namespace=NAMESPACE, auth=auth)

    @invariant()
    def every_connected_client_has_everything_once_and_in_order(self):
        for client in self.clients:
            if client.connection is None:
                continue
            received = [
                packet["args"][0]["id"]
                for packet in client.connection.get_received(NAMESPACE)
                if packet["name"] == EVENT
            ]
            if received:
                if client.expected_first is not None:
                    assert received[0] == client.expected_first, (client.ids, received)
                    client.expected_first = None
                else:
                    assert received[0] == client.ids[-1] + 1, (client.ids, received)
                # No duplicate, no reordering, no gap while connected.
                assert received == list(range(received[0], received[0] + len(received))), received
            client.ids += received
            if client.ids:
                assert client.ids[-1] == self.feed.last_id  # caught up with the stream

    def teardown(self):
        for client in self.clients:
            if client.connection is not None:
                client.connection.disconnect(namespace=NAMESPACE)


ResumeMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_history_and_resume = ResumeMachine.TestCase
