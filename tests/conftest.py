"""Fixtures for the handler tests: a fresh app per test, Flask's test client and Flask-SocketIO's.

They need nothing but the app's own requirements and pytest, so that tests/test_handlers.py and
this file can be copied into another project's CI as they are. The fixtures that start real
servers, browsers, Redis and nginx are in tests/live.py, imported by the tests that use them.
"""
import pytest

from application import create_app, socketio
from protocol import NAMESPACE


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """No test may hang the run: at most 120 s each, where pytest-timeout (requirements-dev.txt) is installed."""
    if config.pluginmanager.hasplugin("timeout") and config.getoption("timeout") is None:
        config.option.timeout = 120


@pytest.fixture
def app():
    """A fresh app whose producer only broadcasts when a test asks it to (its interval is long)."""
    app = create_app({"TESTING": True, "SECRET_KEY": "test", "INTERVAL": 3600.0})
    yield app
    app.extensions["feed"].stop()  # wakes the producer, if a client started one, and ends it


@pytest.fixture
def feed(app):
    return app.extensions["feed"]


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def socketio_client(app):
    """A Flask-SocketIO test client connected to the stream's namespace."""
    test_client = socketio.test_client(app, namespace=NAMESPACE)
    yield test_client
    if test_client.is_connected(NAMESPACE):
        test_client.disconnect(NAMESPACE)
