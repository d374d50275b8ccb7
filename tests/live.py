"""Fixtures for the tests against real things: the server in a subprocess, headless Chromium,
redis-server and nginx. A test module imports the ones it uses (``from live import live_server``).

A program that is missing skips its tests with the reason, and fails them under CI=true.
"""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests
from playwright.sync_api import sync_playwright

from bench.server import free_port
from scripts.screenshot import CHROMIUM, launch_chromium
from support import wait_until

PROJECT = Path(__file__).resolve().parent.parent


class LiveServer:
    """The real server, ``python application.py``, in a subprocess on a free port."""

    def __init__(self, log_dir, env=None, command=None):
        self.port = free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # gunicorn serves the app under SCRIPT_NAME when it is set.
        self.url = f"http://127.0.0.1:{self.port}{self.env.get('SCRIPT_NAME', '')}"
        command = command or [sys.executable, "application.py", "--port", "{port}"]
        self.command = [part.format(port=self.port) for part in command]
        # Find programs such as gunicorn in this Python's environment, activated or not.
        self.command[0] = shutil.which(self.command[0], path=Path(sys.executable).parent) or self.command[0]
        self.log_path = log_dir / f"server-{self.port}.log"
        self.process = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, cwd=PROJECT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(self._ready, timeout=20, message=f"server on {self.url}")
        return self

    def _ready(self):
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code in (200, 503)
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy
            return False

    def health(self):
        """Return /healthz's answer; its status code says the same as its body (503 while degraded)."""
        response = requests.get(self.url + "/healthz", timeout=5)
        body = response.json()
        assert response.status_code == (200 if body["status"] == "ok" else 503), (response.status_code, body)
        return body

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Send ``sig`` and return the exit code (killing the server if it does not exit)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not stop within {timeout} s after {sig!r}")

    def log(self):
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def server_starter(log_dir):
    """Yield a function that starts real servers; stop them all at the end."""
    servers = []

    def start(command=None, **env):
        """``command`` is a list of arguments in which "{port}" stands for the server's port."""
        server = LiveServer(log_dir, {key: str(value) for key, value in env.items()}, command)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# The three ways of serving the app that the tests compare: the command (None: python application.py)
# and the environment of each.
GUNICORN = "gunicorn --worker-class gthread --workers 1 --threads 100 --bind 127.0.0.1:{port} application:create_app()"
SERVERS = {
    "threading": {"command": None, "env": {}},
    "gunicorn": {"command": GUNICORN.split(), "env": {}},
    "gevent": {"command": None, "env": {"ASYNC_MODE": "gevent"}},
}


def start_server(start, kind, **env):
    """Start the development server, gunicorn (gthread) or the gevent server, with ``start`` (a live_server)."""
    return start(command=SERVERS[kind]["command"], **SERVERS[kind]["env"], **env)


@pytest.fixture
def live_server(tmp_path):
    """Start the real server (call it with settings as environment variables); stop it after the test."""
    with server_starter(tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def module_live_server(tmp_path_factory):
    """Like ``live_server``, for one server shared by the many short cases of a module."""
    with server_starter(tmp_path_factory.mktemp("servers")) as start:
        yield start


def skip_unless_ci(reason):
    """Skip the test for a reason such as a missing program; fail it under CI=true, where nothing may be missing."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for a whole test module; skipped (failed under CI=true) if it is missing."""
    if not CHROMIUM.exists():
        skip_unless_ci(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


class BrowserTab:
    """A page in the browser that keeps every URL it requested (WebSockets too) and every error it logged."""

    def __init__(self, page):
        self.page = page
        self.requests = []
        self.errors = []
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("websocket", lambda websocket: self.requests.append(websocket.url))
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message):
        if message.type == "error":
            self.errors.append(f"console: {message.text}")


@pytest.fixture
def open_tab(browser):
    """Open tabs (call it with a URL) in a fresh browser context that is closed after the test.

    ``init_script`` is JavaScript that runs in the tab before the page's own scripts.
    """
    context = browser.new_context()

    def open_tab(url, init_script=None):
        tab = BrowserTab(context.new_page())
        if init_script:
            tab.page.add_init_script(init_script)
        tab.page.goto(url)
        return tab

    yield open_tab
    context.close()


def require_program(name, package):
    """Return the path of a program (looking in the sbin directories too); skip, or fail under CI=true, if missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        skip_unless_ci(f"{name} is missing: apt-get install {package}")
    return path


def stop_process(process, timeout=10):
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def redis_url(tmp_path):
    """Start a real redis-server on a free port, keeping nothing on disk; return its URL."""
    program = require_program("redis-server", "redis-server")
    port = free_port()
    command = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with open(tmp_path / "redis.log", "ab") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    connection = redis.Redis.from_url(url)

    def answers():
        assert process.poll() is None, (tmp_path / "redis.log").read_text()
        try:
            return connection.ping()
        except redis.ConnectionError:
            return False

    wait_until(answers, timeout=10, message="redis-server")
    connection.close()
    yield url
    stop_process(process)


@pytest.fixture
def nginx(tmp_path):
    """Start a real nginx with deploy/nginx.conf in front of the given backend ports; return its URL.

    With ``sub_path`` ("/numbers"), nginx serves the app under it, as docs/deploy.md says.
    """
    program = require_program("nginx", "nginx-light")
    processes = []

    def start(backend_ports, sub_path=""):
        port = free_port()
        site = (PROJECT / "deploy" / "nginx.conf").read_text()
        site = site.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        for number, backend_port in enumerate(backend_ports, start=1):
            site = site.replace(f"server 127.0.0.1:800{number};", f"server 127.0.0.1:{backend_port};")
        site = re.sub(r"\n *server 127\.0\.0\.1:800\d;", "", site)  # fewer backends than the file lists
        assert "800" not in site, "deploy/nginx.conf has changed: update this fixture"
        if sub_path:
            site = site.replace("location / {", f"location {sub_path}/ {{")
            site = site.replace("location ~ ^/(stream|plain)$", f"location ~ ^{sub_path}/(stream|plain)$")
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        (prefix / "numbers.conf").write_text(site)
        # The main configuration a distribution ships, reduced to what this test needs.
        (prefix / "nginx.conf").write_text(
            f"pid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log info;\n"
            "events {}\n"
            "http {\n"
            f"    access_log {prefix}/access.log;\n"
            f"    include {prefix}/numbers.conf;\n"
            "}\n"
        )
        command = [program, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
        with open(prefix / "stdout.log", "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        url = f"http://127.0.0.1:{port}{sub_path}"

        def answers():
            assert process.poll() is None, (prefix / "error.log").read_text()
            try:
                return requests.get(url + "/healthz", timeout=1).ok
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy
                return False

        wait_until(answers, timeout=10, message="nginx")
        return url

    yield start
    for process in processes:
        stop_process(process)
