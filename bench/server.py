"""The server under test: any command in a subprocess, with its CPU time and memory.

A server is a name and a command, such as
``gevent=ASYNC_MODE=gevent python application.py --port {port}``: leading
``NAME=value`` words set environment variables, ``{port}`` stands for a free
port, ``python`` is this interpreter, and the command runs in the project's
folder. Every server also gets ``PORT`` and ``INTERVAL`` in its environment
(the Node reference reads them there).
"""
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

# The Node Socket.IO server doing this app's job (see its README), beside this repository.
REFERENCE_NAME = "node"
DEFAULT_REFERENCE_DIR = PROJECT.parent / "shared" / "reference" / "node-socketio"


def free_port():
    """Return a TCP port that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_command(mode):
    """Return the command that runs this app in an async mode."""
    return f"ASYNC_MODE={mode} python application.py --port {{port}}"


def parse_server(text):
    """Turn ``NAME=COMMAND`` into (name, command); raise ValueError if it is not that."""
    name, equals, command = text.partition("=")
    if not equals or not name.strip() or not command.strip():
        raise ValueError(f"expected NAME=COMMAND, got {text!r}")
    # Fail now, not at the first row, on unbalanced quotes or nothing but assignments.
    if all(ASSIGNMENT.match(word) for word in shlex.split(command)):
        raise ValueError(f"server {name.strip()!r} has no command")
    return name.strip(), command.strip()


def reference_server(directory):
    """Return ("node", its command), or (None, why not and how to install it in one line)."""
    directory = Path(directory)
    if not (directory / "server.js").is_file():
        return None, f"the Node reference is not in {directory}: measuring the rest"
    if not (directory / "node_modules" / "socket.io").is_dir():
        return None, (
            f"the Node reference in {directory} is not installed: measuring the rest; install it with "
            f"`cd {directory} && npm install --no-audit --no-fund` (or copy the folder somewhere writable, "
            f"install it there and pass --reference DIR)"
        )
    if shutil.which("node") is None:
        return None, "node is not installed (apt-get install nodejs): measuring the rest without the reference"
    return REFERENCE_NAME, f"node {shlex.quote(str(directory / 'server.js'))}"


class Server:
    """A server command, pinned to one CPU if ``cpu`` is given."""

    def __init__(self, name, command, interval, cpu=None):
        self.name = name
        self.port = free_port()
        words = [word.format(port=self.port) for word in shlex.split(command)]
        assignments = {}
        while words and ASSIGNMENT.match(words[0]):
            key, _, value = words.pop(0).partition("=")
            assignments[key] = value
        if not words:
            raise ValueError(f"server {name!r} has no command")
        if words[0] == "python":
            words[0] = sys.executable  # this virtualenv's interpreter, activated or not
        self.argv = words
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "INTERVAL": str(interval),
            "PYTHONUNBUFFERED": "1",
            **assignments,
        }
        self.cpu = cpu
        self.log = tempfile.TemporaryFile()
        self.process = None

    def start(self, timeout=20.0):
        """Start the server and wait until its port accepts connections.

        The port, not a health check: the reference has none, and every server is
        started and measured alike.
        """
        # Run the program itself, not a shell: its process id is then the one whose CPU and memory count.
        self.process = subprocess.Popen(
            self.argv, cwd=PROJECT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        if self.cpu is not None:
            # The program is still starting: every thread it creates later inherits this.
            os.sched_setaffinity(self.process.pid, {self.cpu})
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not listen within {timeout} s:\n{self.output()}")
                time.sleep(0.05)

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
        if self.process is None:
            return None
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
