"""Number sources that tests swap in for ``application.next_number`` (see serve_with_source.py)."""
import threading
import time


def markup():
    """Return markup that would run script if the page inserted it as HTML."""
    return '<img src="x" onerror="window.injected = true">'


def multiline():
    """Return a value with a line break, which Server-Sent Events must not split into two events."""
    return "line one\nline two"


def unicode():
    """Return a value outside ASCII, which must arrive as the same characters."""
    return "π ≈ 3.142 ✓"


calls = 0  # how many times a source below has been called in this server process


def raising():
    """Fail every time, as a source whose database is down."""
    raise ConnectionError("database unavailable")


def hanging():
    """Return at once, except that the fifth call hangs for two seconds."""
    global calls
    calls += 1
    if calls == 5:
        time.sleep(2)
    return calls


def hanging_forever():
    """Return three values, then never return again."""
    global calls
    calls += 1
    if calls > 3:
        threading.Event().wait()
    return calls


def slow():
    """Take 0.15 s per value: slower than the 0.1 s interval the tests use."""
    time.sleep(0.15)
    return 1.0


def large():
    """Return 64 kB of text: a client that stops reading soon has full buffers."""
    return "x" * 65536


SIZES = [0, 10, 20, 30, 40, 50, 1000, 65400, 65420, 65440, 65460, 100_000]


def varied():
    """Return text whose size changes at every call: frames on both sides of the WebSocket
    length boundaries (125 and 65,535 bytes), and some too large for one non-blocking send."""
    global calls
    calls += 1
    return "x" * SIZES[calls % len(SIZES)]
