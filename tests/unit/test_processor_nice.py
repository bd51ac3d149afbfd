"""SWITCHBOARD_PROCESSOR_NICE lowers a stream processor's CPU priority (and only that process's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def niceness_after(nice: int) -> int:
    code = (
        "import os; from services.cli import _processor_priority; from services.settings import Settings; "
        f"_processor_priority(Settings(processor_nice={nice})); print(os.nice(0))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_the_processor_runs_at_the_configured_niceness() -> None:
    base = os.nice(0)
    assert niceness_after(0) == base
    assert niceness_after(7) == min(19, base + 7)
    assert os.nice(0) == base  # the caller's own priority is untouched
