"""Log hygiene for every process: a dependency's repeated error lines are let through at most once
per interval, with a count of what was held back.

While Kafka is down under load, aiokafka logs "Unable connect to node…" and "Unable to update
metadata…" for every send that asks for metadata: about 1,000 lines a second per ingress process
(120k in the minute of a broker-restart test), which costs CPU and disk and buries everything
else. The writes themselves are refused UNAVAILABLE, as they should be; one line per message
template per interval says the same."""

from __future__ import annotations

import logging
import threading
import time

# The dependencies whose loggers are filtered (their loggers and every child logger).
NOISY = ("aiokafka",)
EVERY_S = 5.0


class RepeatFilter(logging.Filter):
    """Passes a message template (the unformatted `msg`, per logger) at most once per `every_s`;
    the next one let through says how many were held back meanwhile."""

    def __init__(self, every_s: float = EVERY_S) -> None:
        super().__init__()
        self.every_s = every_s
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            if len(self._last) > 10_000:  # templates, not values: few; bounded all the same
                self._last.clear()
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.msg} [{held} more like this in the last {self.every_s:.0f}s not logged]"
        return True


def quiet_repeats(every_s: float = EVERY_S) -> RepeatFilter:
    """Install one RepeatFilter on the noisy dependencies' loggers (those that exist once they
    are imported). Idempotent per process in effect: a second call adds a second filter."""
    import aiokafka  # noqa: F401  (its modules create their loggers on import)

    repeat = RepeatFilter(every_s)
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] in NOISY]
    for name in {*NOISY, *names}:
        logging.getLogger(name).addFilter(repeat)
    return repeat
