"""aiokafka's repeated error lines (Kafka down under load) are let through once per interval."""

from __future__ import annotations

import logging

import pytest

from services.observability.logs import RepeatFilter, quiet_repeats


def test_a_template_repeated_within_the_interval_is_held_back_and_counted() -> None:
    repeat = RepeatFilter(every_s=3600)
    records = [
        logging.LogRecord(
            "aiokafka", logging.ERROR, __file__, 1, "Unable connect to node with id %s: %s", (1, e), None
        )
        for e in range(1000)
    ]
    passed = [r for r in records if repeat.filter(r)]
    assert len(passed) == 1
    other = logging.LogRecord(
        "aiokafka", logging.ERROR, __file__, 1, "Unable to update metadata from %s", ([1],), None
    )
    assert repeat.filter(other)  # another template is its own


def test_after_the_interval_the_next_line_says_how_many_were_held_back() -> None:
    repeat = RepeatFilter(every_s=0.0)
    repeat._last[("aiokafka", "m %s")] = float("-inf")
    repeat._held[("aiokafka", "m %s")] = 41
    record = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, "m %s", ("x",), None)
    assert repeat.filter(record)
    assert record.getMessage() == "m x [41 more like this in the last 0s not logged]"


def test_installed_on_aiokafkas_own_loggers(caplog: pytest.LogCaptureFixture) -> None:
    repeat = quiet_repeats(every_s=3600)
    try:
        log = logging.getLogger("aiokafka.producer.sender")
        with caplog.at_level(logging.ERROR, logger="aiokafka"):
            for _ in range(50):
                log.error("Got error produce response on %s", "tp")
        assert len([r for r in caplog.records if r.name == "aiokafka.producer.sender"]) == 1
    finally:
        for name in list(logging.Logger.manager.loggerDict):
            if name.split(".")[0] == "aiokafka":
                logging.getLogger(name).removeFilter(repeat)
        logging.getLogger("aiokafka").removeFilter(repeat)
