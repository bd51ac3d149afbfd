"""`switchboard run`'s restarts of its children: growing pauses for a child that keeps dying, and a
start that fails is reported and tried again instead of ending the runner (real processes; the
clock is passed in)."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services import cli, processes
from services.processes import Child
from services.runner import (
    RESTART_CAP_S,
    SERVED_S,
    SPARE_AFTER_S,
    STABLE_S,
    Backoff,
    look_after_children,
    look_after_spares,
)


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


def _status_child(tmp_path: Path) -> Child:
    """A real `switchboard stack status` over an empty data directory: it prints each server's
    status as JSON and exits 1 (none is running)."""
    return Child(
        "status", ["stack", "status"], tmp_path / "status.log", {"SWITCHBOARD_DATA_DIR": str(tmp_path)}
    )


def _dead_child_with_spare(tmp_path: Path) -> tuple[Child, subprocess.Popen[bytes]]:
    """A child whose command ran and ended, and a warm spare beside it."""
    child = _status_child(tmp_path)
    child.start()
    assert child.proc is not None
    child.proc.wait(60)
    child.start_spare()
    assert child.spare is not None
    return child, child.spare


def test_a_warm_spare_runs_its_command_only_once_it_takes_over(tmp_path: Path) -> None:
    child = _status_child(tmp_path)
    child.start_spare()
    assert child.take_over()
    assert child.spare is None and child.proc is not None
    assert child.proc.wait(60) == 1
    assert '"kafka"' in child.log_path.read_text()
    # Told nothing, its stdin closed (the runner gone): it exits without running the command.
    child.log_path.unlink()
    child.start_spare()
    spare = child.spare
    assert spare is not None and spare.stdin is not None
    spare.stdin.close()
    assert spare.wait(60) == 0
    assert '"kafka"' not in child.log_path.read_text()
    # A stop ends a spare at once, whatever it is doing (it holds nothing).
    child.start_spare()
    spare = child.spare
    assert spare is not None
    child.stop_spare()
    assert spare.returncode == -9 and child.spare is None
    assert not child.take_over()  # none left


def test_a_dead_child_is_replaced_by_its_warm_spare_and_a_new_spare_follows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    child, spare = _dead_child_with_spare(tmp_path)
    backoffs = {"status": Backoff(up_since=0.0)}
    spares = {"status": Backoff(up_since=0.0)}
    look_after_children({"status": child}, backoffs, 100.0, spares)
    assert child.proc is spare and child.spare is None
    assert f"status: its warm spare (pid {spare.pid}) took over" in capsys.readouterr().out
    assert child.proc.wait(60) == 1  # it ran the command
    # A long-lived stand-in for the child it became, from here on (its command has ended).
    child.proc = subprocess.Popen(["sleep", "60"])
    try:
        # The next spare waits SPARE_AFTER_S: its imports would take CPU from the start it spares.
        look_after_spares({"status": child}, spares, 100.0 + SPARE_AFTER_S - 0.1)
        assert child.spare is None
        look_after_spares({"status": child}, spares, 100.0 + SPARE_AFTER_S)
        assert child.spare_alive
    finally:
        child.proc.kill()
        child.proc.wait()
        child.stop_spare()


def test_a_spare_that_dies_while_waiting_is_started_again_after_a_pause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The child: a spare told to run nothing useful would end; a long-lived real process instead.
    child = Child("long", ["stack", "status"], tmp_path / "long.log", {"SWITCHBOARD_DATA_DIR": str(tmp_path)})
    child.proc = subprocess.Popen(["sleep", "60"])
    try:
        spares = {"long": Backoff(up_since=None)}
        look_after_spares({"long": child}, spares, 100.0)
        first = child.spare
        assert first is not None and child.spare_alive
        first.kill()
        first.wait()
        look_after_spares({"long": child}, spares, 101.0)
        assert child.spare is None
        assert "long's warm spare exited (code -9); another in 5s" in capsys.readouterr().out
        look_after_spares({"long": child}, spares, 101.0 + SPARE_AFTER_S - 0.1)
        assert child.spare is None
        look_after_spares({"long": child}, spares, 101.0 + SPARE_AFTER_S)
        assert child.spare_alive and child.spare is not first
        # No spare beside a child that is not running.
        child.stop_spare()
        child.proc.kill()
        child.proc.wait()
        look_after_spares({"long": child}, spares, 200.0)
        assert child.spare is None
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
        child.stop_spare()


def test_a_spare_started_on_older_code_is_not_used_and_the_next_waits_for_the_new_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    child, spare = _dead_child_with_spare(tmp_path)
    # The code changed since (an edit, a `git pull`).
    newer = processes.code_fingerprint() + 1.0
    monkeypatch.setattr(processes, "code_fingerprint", lambda: newer)
    spares = {"status": Backoff(up_since=0.0)}
    look_after_children({"status": child}, {"status": Backoff(up_since=0.0)}, 100.0, spares)
    assert (
        "status: its warm spare was started on older code; starting a new process" in capsys.readouterr().out
    )
    assert spare.poll() is not None and child.spare is None
    assert child.proc is not spare and child.proc is not None
    # The next spare waits until the start under way had its CPU.
    assert spares["status"].next_at == 100.0 + SPARE_AFTER_S
    child.proc.wait(60)


def _listening_process() -> tuple[subprocess.Popen[bytes], int]:
    """A process that listens on a port of its own (what a served child looks like)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.create_server(('127.0.0.1', 0)); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_a_child_that_served_is_started_again_at_once_however_often_it_dies(tmp_path: Path) -> None:
    # Killed every 10 s, each time after it served for 6 s (> SERVED_S): never a crash loop, never a pause (by
    # lifetime alone it waited 1, 2, 4, 8 s more each time: benchmarks/worker_restart.py).
    child = Child("served", ["no-such-command"], tmp_path / "served.log")
    backoff = Backoff()
    for i in range(4):
        t = 100.0 + 10 * i
        child.proc, port = _listening_process()
        child.ready_address = f"127.0.0.1:{port}"
        backoff.started(t)
        look_after_children({"served": child}, {"served": backoff}, t)
        assert backoff.served_at == t
        child.proc.kill()
        child.proc.wait()
        look_after_children({"served": child}, {"served": backoff}, t + 6.0)
        assert backoff.failures == 1 and backoff.next_at == t + 6.0  # started again at once
        child.proc.wait(60)  # `no-such-command` ends at once


def test_a_port_answered_by_another_process_is_not_the_child_serving(tmp_path: Path) -> None:
    # Another program on the child's port (a local ClickHouse on 8123): the child dying there is
    # still a crash loop, and waits.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        child = Child(
            "crashing", ["no-such-command"], tmp_path / "crashing.log", ready_address=f"127.0.0.1:{port}"
        )
        child.proc = subprocess.Popen(["sleep", "60"])
        backoff = Backoff(up_since=200.0, failures=1)
        look_after_children({"crashing": child}, {"crashing": backoff}, 200.0)
        assert backoff.served_at is None
        child.proc.kill()
        child.proc.wait()
        look_after_children({"crashing": child}, {"crashing": backoff}, 206.0)
        assert backoff.failures == 2 and backoff.next_at == 207.0
        # Served, but for less than SERVED_S: a process that fails soon after it binds its port
        # is not taken for a killed one either.
        child.proc, own = _listening_process()
        child.ready_address = f"127.0.0.1:{own}"
        backoff.started(300.0)
        look_after_children({"crashing": child}, {"crashing": backoff}, 302.0)
        assert backoff.served_at == 302.0
        child.proc.kill()
        child.proc.wait()
        look_after_children({"crashing": child}, {"crashing": backoff}, 302.0 + SERVED_S - 0.5)
        assert backoff.failures == 3 and backoff.next_at == 302.0 + SERVED_S - 0.5 + 2.0


@pytest.mark.parametrize(
    "argv",
    [["analytics"], ["ingress"], ["worker", "sessions"], ["worker", "assistant"], ["worker", "archiver"]],
)
def test_what_a_spare_imports_exists_for_every_process_the_runner_starts(argv: list[str]) -> None:
    # A renamed module would end every spare at once (each start a doomed process, then a pause).
    modules = cli._modules_of(cli.build_parser().parse_args(argv))
    assert modules
    for module in modules:
        importlib.import_module(module)
