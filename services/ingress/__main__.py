"""One ingress server process, as `switchboard ingress` runs N of them (see _supervisor)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys

from pydantic import ValidationError

from services import eventloop
from services.ingress._server import serve
from services.ingress._supervisor import CHILD_ENV
from services.observability.logs import quiet_repeats
from services.processes import die_with_parent
from services.settings import load_settings


def main() -> int:
    die_with_parent()  # first: a supervisor killed from here on takes this process with it
    parser = argparse.ArgumentParser(prog="python -m services.ingress")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [ingress {os.environ.get(CHILD_ENV, '-')} pid %(process)d] "
        "%(name)s %(message)s",
    )
    try:
        settings = load_settings()
    except ValidationError as exc:
        sys.exit(f"switchboard ingress: invalid configuration:\n{exc}")
    eventloop.install()
    quiet_repeats()
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
