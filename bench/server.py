"""The server under test: ``python application.py`` in a subprocess, with its CPU time and memory."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def free_port():
    """Return a TCP port that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python application.py`` in one async mode, pinned to one CPU if ``cpu`` is given."""

    def __init__(self, mode, interval, cpu=None):
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "ASYNC_MODE": mode, "INTERVAL": str(interval), "PYTHONUNBUFFERED": "1"}
        self.cpu = cpu
        self.log = tempfile.TemporaryFile()
        self.process = None

    def start(self, timeout=20.0):
        """Start the server and wait until it answers its health check."""
        command = [sys.executable, "application.py", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, cwd=PROJECT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        if self.cpu is not None:
            # The interpreter is still starting: every thread it creates later inherits this.
            os.sched_setaffinity(self.process.pid, {self.cpu})
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                return self.health(timeout=1.0)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.output()}")
                time.sleep(0.05)

    def health(self, timeout=30.0):
        """Return the server's /healthz answer (a loaded server may take seconds to give it)."""
        with urllib.request.urlopen(self.url + "/healthz", timeout=timeout) as response:
            return json.load(response)

    def cpu_seconds(self):
        """Return the CPU time (user + system) the server has used so far, all threads included."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # the process name, in parentheses, may hold spaces
        user, system = int(fields[11]), int(fields[12])
        return (user + system) / CLOCK_TICKS

    def memory_bytes(self):
        """Return the server's resident memory (RSS)."""
        resident_pages = int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[1])
        return resident_pages * PAGE_SIZE

    def stop(self, timeout=10.0):
        """Stop the server as Ctrl+C would; kill it if it does not exit in time. Return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self):
        """Return everything the server has logged."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")
