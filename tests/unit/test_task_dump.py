"""`kill -USR2 <pid>` makes a Switchboard process log every asyncio task with where it waits
(services/eventloop.dump_tasks): what a worker that processes and logs nothing is stuck on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.eventloop import DUMP_MARK

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigusr2_logs_each_task_and_the_line_it_waits_on(tmp_path: Path, loop: str) -> None:
    code = textwrap.dedent(
        """
        import asyncio, logging
        from services import eventloop
        logging.basicConfig(level="INFO")
        eventloop.install()

        async def fetch(never: asyncio.Event) -> None:
            await never.wait()

        async def waits_for_a_server_that_never_answers(never: asyncio.Event) -> None:
            await fetch(never)

        async def main() -> None:
            never = asyncio.Event()
            asyncio.create_task(waits_for_a_server_that_never_answers(never), name="stuck-fetch")
            await asyncio.sleep(0)  # the task runs to its await
            print("ready", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    script = tmp_path / "stuck.py"
    script.write_text(code)
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-u", str(script)],
            cwd=PROJECT_ROOT,
            env={**os.environ, "SWITCHBOARD_EVENT_LOOP": loop},
            stdout=subprocess.PIPE,
            stderr=out,
        )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while DUMP_MARK not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert DUMP_MARK in text, text
        assert "stuck-fetch" in text and "waits_for_a_server_that_never_answers" in text, text
        # The whole chain, down to the line and the object it waits on.
        assert "in fetch" in text and "await never.wait()" in text, text
        assert proc.poll() is None, "the process must go on after the dump"
    finally:
        proc.kill()
        proc.wait()


def test_a_frame_without_a_line_number_does_not_break_the_dump() -> None:
    # Seen in a test's failure report: a frame whose f_lineno is None (CPython gives None for some
    # frames) made linecache raise TypeError, and the dump of that process was lost.
    from services.eventloop import _await_chain

    class Frame:
        f_code = test_a_frame_without_a_line_number_does_not_break_the_dump.__code__
        f_lineno = None

    class Coroutine:
        cr_frame = Frame()
        cr_await = None

    lines = _await_chain(Coroutine())
    assert "line None, in test_a_frame_without_a_line_number_does_not_break_the_dump" in lines[0], lines
