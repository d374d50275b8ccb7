"""Number sources that tests swap in for ``application.next_number`` (see serve_with_source.py)."""


def markup():
    """Return markup that would run script if the page inserted it as HTML."""
    return '<img src="x" onerror="window.injected = true">'


def multiline():
    """Return a value with a line break, which Server-Sent Events must not split into two events."""
    return "line one\nline two"


def unicode():
    """Return a value outside ASCII, which must arrive as the same characters."""
    return "π ≈ 3.142 ✓"


def large():
    """Return 30 kB, so that a client that stops reading fills its connection's buffers at once."""
    return "x" * 30_000
