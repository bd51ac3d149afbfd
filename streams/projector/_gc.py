"""A pause of the cyclic garbage collector around the projector's batch work."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a batch is built or serialized for its insert
    (nested and concurrent uses share one pause; the last to leave restores what the first found).

    Building a batch allocates tens of thousands of objects that live until its insert (decoded
    events, column values) and makes no reference cycles; the collections that allocation count
    triggers scan every live object of the process, and were a quarter of `rows_of`'s CPU
    (15.5 -> 12 us per event measured in benchmarks/projector_rows.py); clickhouse-connect's
    transposition of tuple columns paid the same. Reference counting still
    frees everything; cyclic garbage made meanwhile waits for the next collection.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()
