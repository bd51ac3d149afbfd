"""`switchboard run` (`make run`) stops as on Ctrl-C when its terminal goes away (SIGHUP).

Review of 7d6905e (services/processes.py, PR_SET_PDEATHSIG): a runner that dies now takes its
children with it by SIGKILL. `run_system` handles SIGINT and SIGTERM but not SIGHUP, which a
closed terminal or a dropped SSH session sends to `make` and the runner (the foreground process
group): the runner dies at once, the ingress and the workers are SIGKILLed without draining, and
Kafka, Redis and SeaweedFS are left running, as after a kill -9 (the next `make run` adopts them).

Own runner, data directory and ports: the block of test_runner_restarts.py moved up by 2000.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from services import stack
from tests.integration.test_runner_restarts import Runner, runner_env, serving_runner

pytestmark = pytest.mark.integration

_SHIFT = 2000


class HangupNotAStop(AssertionError):
    """The finding itself: a hangup that is not a stop."""


@pytest.fixture
async def own_runner(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Runner]:
    env = runner_env(tmp_path_factory.mktemp("runner-hangup"), shift=_SHIFT)
    async with serving_runner(env) as started:
        yield started


@pytest.mark.timeout(300)
async def test_a_hangup_stops_the_runner_as_ctrl_c_does(own_runner: Runner) -> None:
    # Unless it was started under nohup: test_runner_restarts.py's runner is, and its first test
    # sends it a hangup (one stack start fewer than a runner of its own here).
    own_runner.proc.send_signal(signal.SIGHUP)
    code = await asyncio.to_thread(_stop_within, own_runner, 90.0)
    servers = {name: s["pid"] for name, s in (await stack.status(own_runner.settings)).items()}
    print(f"after SIGHUP: runner exit code {code}, servers {servers}")
    # "== stopped" once everything is down (a new user's walkthrough: the log ended at
    # "== stopping", and nothing said whether the stop had finished).
    stopped = "== stopping" in own_runner.output() and "== stopped" in own_runner.output()
    if code != 0 or not stopped or any(servers.values()):
        raise HangupNotAStop(
            f"after SIGHUP the runner exited with {code} (0 and '== stopping' then '== stopped' expected) and left "
            f"servers running: {servers}; output tail:\n{own_runner.output()[-1500:]}"
        )


def _stop_within(runner: Runner, within_s: float) -> int | None:
    try:
        return runner.proc.wait(within_s)
    except Exception:
        return None
