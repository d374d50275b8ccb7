"""The watchdog extra with the handlers' test clients: a source that hangs is never called twice at once."""
import threading
import time

import application
from application import create_app, socketio
from protocol import NAMESPACE
from test_handlers import wait_until


def test_a_hanging_source_is_not_called_again_after_a_producer_restart(monkeypatch):
    calls = []
    release = threading.Event()

    def hanging():
        calls.append(None)
        release.wait(10)
        return 1.0

    monkeypatch.setattr(application, "next_number", hanging)
    app = create_app({"TESTING": True, "INTERVAL": 0.02, "GRACE_PERIOD": 0.05})
    feed = app.extensions["feed"]
    try:
        test_client = socketio.test_client(app, namespace=NAMESPACE)
        wait_until(lambda: calls, message="the first call")
        test_client.disconnect(NAMESPACE)
        wait_until(lambda: feed.producer is None, message="the producer to stop")
        test_client = socketio.test_client(app, namespace=NAMESPACE)  # a new producer, the call still hangs
        wait_until(lambda: feed.status()["status"] == "degraded", message="the hang to be reported")
        time.sleep(0.2)  # ten ticks of the new producer: none may call the hanging source again
        assert len(calls) == 1
        release.set()
        wait_until(lambda: feed.last_id >= 1, message="the late value to go out")
        test_client.disconnect(NAMESPACE)
    finally:
        release.set()
        feed.stop()
