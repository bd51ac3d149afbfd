"""Subcommands of `switchboard` that live in their own module.

Each module here defines `register(sub)`, which adds its parser(s) to the `switchboard` subparsers
(`sub.add_parser(...)`, `set_defaults(func=...)`; `func(args) -> int`). They are found by name, so a
new command is one new file and no edit of `services/cli.py`. Keep imports of heavy modules inside
the command functions: `switchboard --help` loads every module here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Any


def kafka_failed(command: str, exc: BaseException, maybe_written: str = "") -> int:
    """A command's Kafka failure as one line on stderr (no traceback); `maybe_written` says what
    a write may have recorded anyway (its answer can be lost after the write). Returns 1."""
    print(
        f"switchboard {command}: Kafka failed ({exc!r}){'; ' + maybe_written if maybe_written else ''}",
        file=sys.stderr,
    )
    return 1


def register_all(sub: argparse._SubParsersAction[Any]) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
