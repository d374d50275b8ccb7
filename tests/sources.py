"""Number sources that tests swap in for ``application.next_number`` (see serve_with_source.py)."""


def markup():
    """Return markup that would run script if the page inserted it as HTML."""
    return '<img src="x" onerror="window.injected = true">'
