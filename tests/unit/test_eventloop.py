"""Every Switchboard command runs on uvloop unless SWITCHBOARD_EVENT_LOOP=asyncio says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import asyncio\n"
    "from services import eventloop\n"
    "print(eventloop.install())\n"
    "async def main():\n"
    "    return type(asyncio.get_running_loop()).__module__\n"
    "print(asyncio.run(main()))\n"
)


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, "uvloop"), ("asyncio", "asyncio"), ("UVLOOP", "uvloop")]
)
def test_the_loop_asyncio_run_uses_is_the_one_the_setting_names(setting: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SWITCHBOARD_EVENT_LOOP"}
    if setting is not None:
        env["SWITCHBOARD_EVENT_LOOP"] = setting
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out[0] == expected
    assert out[1].split(".")[0] == expected


def test_freeze_heap_moves_what_start_up_made_out_of_the_collectors_reach() -> None:
    probe = (
        "import gc\n"
        "from services import eventloop\n"
        "made_at_start_up = [[i] for i in range(50_000)]\n"
        "eventloop.freeze_heap()\n"
        "print(gc.get_freeze_count(), len(gc.get_objects(2)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    frozen, left_in_oldest = int(out[0]), int(out[1])
    assert frozen > 50_000
    assert left_in_oldest < 1_000  # a full collection no longer walks them
