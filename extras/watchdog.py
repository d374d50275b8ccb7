"""A source that fails or hangs must not stop the schedule: next_number() with a deadline.

The producer calls the source once a tick. This extra wraps it: the call runs in
a task of its own, and the producer waits for it one interval at most. A tick
without a value is skipped, and the log says so once when the source starts to
fail and once when it works again; meanwhile /healthz says "degraded" (and 503).
A call that hangs is never made twice at once: until it returns, later ticks
wait for the same call, across producer restarts too.
"""
import logging
import queue
import time

logger = logging.getLogger("extras.watchdog")


def init_app(app):
    """Put a deadline of one INTERVAL on the feed's source, and report its problems in /healthz."""
    feed = app.extensions["feed"]
    watchdog = Watchdog(feed.source, app.config["INTERVAL"], app.extensions["socketio"].start_background_task)
    feed.source = watchdog
    feed.health_checks.append(watchdog.health)


class Watchdog:
    """Call a source with a deadline; remember what went wrong until it works again."""

    def __init__(self, source, deadline, start_task):
        self.source = source
        self.deadline = deadline
        self.start_task = start_task
        self.results = queue.Queue()  # what each call returned or raised
        self.calling_since = None  # when the call still outstanding started, or None
        self.problem = None  # why ticks are being skipped, or None

    def __call__(self):
        """Return the source's value, or None if it failed or has not returned within the deadline."""
        if self.calling_since is None:
            self.calling_since = time.monotonic()
            self.start_task(self._call)
        try:
            value, error = self.results.get(timeout=self.deadline)
        except queue.Empty:
            self._report(f"next_number() has not returned for {time.monotonic() - self.calling_since:.1f} s")
            return None
        on_time = time.monotonic() - self.calling_since <= self.deadline
        self.calling_since = None
        if error is not None:
            self._report(f"next_number() failed: {error!r}", error)
            return None
        if on_time and self.problem:
            logger.info("next_number() works again; broadcasts resume")
            self.problem = None
        return value

    def _call(self):
        try:
            self.results.put((self.source(), None))
        except Exception as error:
            self.results.put((None, error))

    def _report(self, problem, error=None):
        """Log why ticks are skipped only when the source starts to fail, not at every tick."""
        if self.problem is None:
            logger.warning("%s; skipping broadcasts until it works again", problem, exc_info=error)
        self.problem = problem

    def health(self):
        """The source's problem, for /healthz."""
        return {"problem": self.problem}
