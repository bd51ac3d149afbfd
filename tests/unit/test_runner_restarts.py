"""`switchboard run`'s restarts of its children: growing pauses for a child that keeps dying, and a
start that fails is reported and tried again instead of ending the runner (real processes; the
clock is passed in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.processes import Child
from services.runner import RESTART_CAP_S, STABLE_S, Backoff, look_after_children


def test_pauses_grow_to_the_cap_and_start_afresh_after_a_stable_run() -> None:
    backoff = Backoff(up_since=0.0)
    pauses = []
    now = 100.0
    for _ in range(8):
        pauses.append(backoff.failed(now))
        assert not backoff.due(now + pauses[-1] - 0.01) or pauses[-1] == 0
        now += pauses[-1]
        backoff.started(now)
        now += 0.5  # dies at once
    assert pauses == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, RESTART_CAP_S, RESTART_CAP_S]
    # Up long enough: the next death is restarted at once again.
    backoff.started(now)
    assert backoff.failed(now + STABLE_S) == 0.0


def test_failed_starts_count_as_failures() -> None:
    backoff = Backoff(up_since=0.0)
    assert backoff.failed(10.0) == 0.0
    assert backoff.failed(10.0) == 1.0  # the start itself failed: not up in between
    assert not backoff.due(10.5)
    assert backoff.due(11.0)


def test_a_child_that_dies_at_once_is_restarted_with_growing_pauses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real `switchboard` process that exits at once (exit 2: unknown command).
    child = Child("flaky", ["no-such-command"], tmp_path / "flaky.log")
    backoffs = {"flaky": Backoff(up_since=0.0)}
    child.start()
    assert child.proc is not None
    child.proc.wait()
    starts = []
    for now in (100.0, 100.5, 101.0, 101.5, 102.0, 102.5, 103.0, 104.0, 105.0):
        before = child.proc
        look_after_children({"flaky": child}, backoffs, now)
        if child.proc is not before:
            starts.append(now)
        child.proc.wait()
    # At once, then 1 s after the next death, then 2 s, then 4 s (not yet at 105).
    assert starts == [100.0, 101.5, 104.0]
    out = capsys.readouterr().out
    assert "flaky exited (code 2" in out
    assert "starting it again in 2s" in out


def test_a_start_that_fails_is_reported_and_tried_again_later(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its log cannot be opened (a file where its directory should be): Child.start raises OSError.
    (tmp_path / "not-a-dir").write_text("")
    child = Child("doomed", ["no-such-command"], tmp_path / "not-a-dir" / "doomed.log")
    backoffs = {"doomed": Backoff(up_since=0.0)}
    look_after_children({"doomed": child}, backoffs, 100.0)
    assert "starting doomed failed" in capsys.readouterr().out
    assert backoffs["doomed"].next_at == 101.0
    look_after_children({"doomed": child}, backoffs, 100.5)  # not due: not tried
    assert capsys.readouterr().out == ""
    look_after_children({"doomed": child}, backoffs, 101.0)
    assert "next try in 2s" in capsys.readouterr().out
    # Once it can start, it does.
    (tmp_path / "not-a-dir").unlink()
    look_after_children({"doomed": child}, backoffs, 103.0)
    assert child.proc is not None
    child.proc.wait()
