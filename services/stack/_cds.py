"""A class-data archive (AppCDS, Java 17's dynamic archive) of the embedded Kafka's classes.

Why: a Kafka JVM spends its first seconds loading and verifying some 9,000 classes; mapped from
an archive they cost a fraction of that. It matters most after a `kill -9`, when writes wait for
the restarted broker (benchmarks/kafka_restart.py, benchmarks/RESULTS.md).

The archive is made once per Kafka version and Java, by `stack install`: a Kafka of its own on
a scratch directory and free loopback ports is started with `-XX:ArchiveClassesAtExit`, given a
topic, a few records and a consumer group (so the classes of those paths are in it too), and
stopped with SIGTERM; the JVM writes the archive as it exits. It is checked by a JVM that must
map it (`-Xshare:on`), then moved into place with a note of what it was made with.

A missing, stale or damaged archive must never stop Kafka from starting:
- it is used only if its note matches this Java and these jars and its size is the one written
  (a truncated archive makes Java 17 crash with SIGBUS instead of ignoring it);
- `-XX:+VerifySharedSpaces` checks its checksums at start (~50 ms): a damaged one is ignored;
- an archive the JVM finds stale anyway (a jar changed) is ignored by the JVM with one warning;
- a Kafka that exits while starting with it is started again without it
  (services/stack/_supervisor.py); it is dropped only if a JVM then cannot map it or finds it
  damaged while the same JVM without it starts, or after it survived MAX_KEPT_DEATHS such exits
  (it may be shared by other stacks, and an exit may have had another cause: `drop_unless_sound`);
  a failed making is noted and not tried again for the same Java and jars.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from services.settings import Settings
from services.stack._layout import LOOPBACK, Layout, StackError

log = logging.getLogger(__name__)

# Flags of the JVM that makes the archive: -Xlog keeps the dump's hundreds of "class not
# supported by CDS" notes (classes of old bytecode versions, skipped) out of the install log.
DUMP_FLAGS = ("-Xlog:cds*=error",)
MAKE_TIMEOUT_S = 180.0
EXERCISE_TIMEOUT_S = 60.0
# Failed makings (a port taken under it, a machine too busy) before the next installs stop trying.
MAX_ATTEMPTS = 2
STARTED_MARK = b"Kafka Server started"


def identity(java: str, libs: Path) -> dict[str, Any]:
    """What an archive is valid for: this Java binary and these jars (paths, sizes, mtimes).
    The JVM checks the same and ignores a mismatching archive; checked here too, so that a stale
    archive is made again by the next install instead of being ignored at every start."""
    real = Path(java).resolve()
    st = real.stat()
    jars = sorted(p for p in libs.glob("*.jar"))
    return {
        "java": str(real),
        "java_size": st.st_size,
        "java_mtime_ns": st.st_mtime_ns,
        "jars": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in jars],
        "libs": str(libs.resolve()),
    }


def note_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".json")


def read_note(archive: Path) -> dict[str, Any] | None:
    try:
        note = json.loads(note_path(archive).read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def usable(note: dict[str, Any] | None, current: dict[str, Any], archive_size: int | None) -> bool:
    """Whether an archive with this note and size may be handed to a JVM made of `current`."""
    return (
        note is not None
        and "failed" not in note
        and note.get("identity") == current
        and archive_size is not None
        and note.get("size") == archive_size
    )


def should_make(note: dict[str, Any] | None, current: dict[str, Any], archive_size: int | None) -> bool:
    """Make one unless a usable one is there, or making one failed MAX_ATTEMPTS times (or one
    was dropped) for these very jars and Java."""
    if usable(note, current, archive_size):
        return False
    if note is None or "failed" not in note or note.get("identity") != current:
        return True
    return int(note.get("attempts", MAX_ATTEMPTS)) < MAX_ATTEMPTS


def to_make(
    settings: Settings, java: str, libs: Path
) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
    """(archive path, current identity, its note) when an archive is to be made, else None. Read
    without any lock by `stack install`'s fast path; `ensure` asks again under the install lock."""
    if not settings.kafka_cds:
        return None
    archive = Layout.of(settings).kafka_cds_archive(settings.kafka_version)
    try:
        current = identity(java, libs)
    except OSError as exc:
        log.warning("no Kafka class-data archive: %s", exc)
        return None
    note = read_note(archive)
    return (archive, current, note) if should_make(note, current, _size(archive)) else None


def _version(path: Path) -> tuple[int, int, int] | None:
    """Which file is at `path` (inode, size, mtime), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _size(path: Path) -> int | None:
    version = _version(path)
    return None if version is None else version[1]


def archive_flags(settings: Settings, java: str, libs: Path) -> list[str]:
    """The JVM flags that use the archive, or none when there is no usable one."""
    if not settings.kafka_cds:
        return []
    archive = Layout.of(settings).kafka_cds_archive(settings.kafka_version)
    try:
        current = identity(java, libs)
    except OSError:
        return []
    if not usable(read_note(archive), current, _size(archive)):
        return []
    return [f"-XX:SharedArchiveFile={archive}", "-XX:+VerifySharedSpaces"]


CHECK_TIMEOUT_S = 60.0
# Deaths while starting with an archive that still checked, before it is dropped anyway: one that
# passes the check yet kills Kafka later in its start must not cost every start a failed try.
MAX_KEPT_DEATHS = 3


async def maps(jvm: list[str], archive: Path | None, cwd: Path) -> tuple[bool, str]:
    """Whether a JVM made of `jvm` (without archive flags) must-maps `archive` and finds its
    checksums right (`-Xshare:on` fails otherwise), and the JVM's last output. With no archive:
    whether that JVM starts at all (the control of a failed check)."""
    flags = [f"-XX:SharedArchiveFile={archive}", "-Xshare:on", "-XX:+VerifySharedSpaces"] if archive else []
    check = await asyncio.create_subprocess_exec(
        *jvm[:1], *flags, *jvm[1:], "kafka.Kafka", "--version",
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(check.communicate(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return False, f"no answer within {CHECK_TIMEOUT_S:.0f}s"
    finally:
        if check.returncode is None:  # timed out, or the caller was cancelled
            with contextlib.suppress(ProcessLookupError):
                check.kill()
            await check.wait()
    return check.returncode == 0, output.decode(errors="replace")[-500:]


async def drop_unless_sound(settings: Settings, jvm: list[str], java: str, libs: Path, reason: str) -> bool:
    """A Kafka started with the archive exited while starting. Whether the archive is dropped:
    only if a JVM cannot map it or finds it damaged while the same JVM without it starts (else the
    check says nothing: memory short, a machine too busy), or if it checked at each of the last
    MAX_KEPT_DEATHS deaths. An archive that maps and checks is kept, because it is shared
    (SWITCHBOARD_KAFKA_INSTALL_DIR) and the exit had another cause (a bad config, a full disk, a
    kill); that start is tried again without it all the same."""
    archive = Layout.of(settings).kafka_cds_archive(settings.kafka_version)
    cwd = archive.parent / "checks"  # a crashing JVM's hs_err file goes there, not beside the jars
    cwd.mkdir(parents=True, exist_ok=True)
    checked = _version(archive)
    sound, output = await maps(jvm, archive, cwd)
    if _version(archive) != checked:
        # Another stack sharing the install made a new one meanwhile (no lock is held here, the
        # install's may be held for minutes): this verdict is not about it.
        return False
    if sound:
        note = read_note(archive) or {}
        deaths = int(note.get("kept_deaths", 0)) + 1
        if deaths < MAX_KEPT_DEATHS:
            with contextlib.suppress(OSError):
                _write_note(archive, {**note, "kept_deaths": deaths})
            return False
        drop(settings, java, libs, f"{reason}\n\nKafka died starting with it {deaths} times; it checks")
        return True
    control, control_output = await maps(jvm, None, cwd)
    if not control:
        log.warning(
            "the class-data archive failed its check, and so did a JVM without it (%s): kept",
            control_output[-200:],
        )
        return False
    drop(settings, java, libs, f"{reason}\n\nchecked again: {output}")
    return True


def drop(settings: Settings, java: str, libs: Path, reason: str) -> None:
    """A Kafka started with the archive exited while starting: never use it again (the note
    keeps the reason, so the next install does not make the same one again)."""
    archive = Layout.of(settings).kafka_cds_archive(settings.kafka_version)
    archive.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _write_note(
            archive, {"identity": identity(java, libs), "failed": reason[:2000], "attempts": MAX_ATTEMPTS}
        )


def _write_note(archive: Path, note: dict[str, Any]) -> None:
    tmp = note_path(archive).with_suffix(".tmp")
    tmp.write_text(json.dumps(note, indent=1) + "\n")
    tmp.replace(note_path(archive))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


async def ensure(
    settings: Settings, jvm: list[str], java: str, libs: Path, config: Callable[[Path, int, int], str]
) -> None:
    """Make the archive unless a usable one exists (or making one failed before for these jars).
    Never raises: without an archive Kafka starts as it always did. `jvm` is the broker's JVM
    command line up to the main class, without archive flags; `config` renders a
    server.properties from (scratch log dir, broker port, controller port)."""
    wanted = to_make(settings, java, libs)
    if wanted is None:
        return
    archive, current, note = wanted
    failed_before = note is not None and "failed" in note and note.get("identity") == current
    attempts = int(note.get("attempts", 0)) + 1 if note is not None and failed_before else 1
    scratch = archive.with_name(archive.stem + ".making")
    started = time.monotonic()
    try:
        size = await asyncio.wait_for(_make(jvm, config, scratch, archive), MAKE_TIMEOUT_S)
    except Exception as exc:  # anything: noted, and Kafka starts without an archive
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("could not make Kafka's class-data archive (%s); Kafka starts without one", reason)
        with contextlib.suppress(OSError):
            _write_note(archive, {"identity": current, "failed": reason[:2000], "attempts": attempts})
        return
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _write_note(archive, {"identity": current, "size": size, "made_s": round(time.monotonic() - started, 1)})
    log.info("Kafka class-data archive made in %.1fs (%s)", time.monotonic() - started, archive)


async def _make(jvm: list[str], config: Callable[[Path, int, int], str], scratch: Path, archive: Path) -> int:
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "data").mkdir(parents=True)
    port, controller_port = _free_port(), _free_port()
    config_path = scratch / "server.properties"
    config_path.write_text(config(scratch / "data", port, controller_port))
    out_path = scratch / "kafka.log"
    cluster_id = "cds" + uuid.uuid4().hex[:19]
    with out_path.open("ab") as out:
        fmt = await asyncio.create_subprocess_exec(
            *jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config_path),
            cwd=scratch, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if await fmt.wait() != 0:
            raise StackError(f"formatting the scratch Kafka failed: {out_path.read_text()[-500:]}")
    made = archive.with_name(archive.name + ".new")
    made.unlink(missing_ok=True)
    with out_path.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *jvm[:1], f"-XX:ArchiveClassesAtExit={made}", *DUMP_FLAGS, *jvm[1:], "kafka.Kafka", str(config_path),
            cwd=scratch, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        while STARTED_MARK not in out_path.read_bytes():
            if proc.returncode is not None:
                raise StackError(
                    f"the scratch Kafka exited ({proc.returncode}): {out_path.read_text()[-500:]}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.2)
        try:
            await asyncio.wait_for(_exercise(f"{LOOPBACK}:{port}"), EXERCISE_TIMEOUT_S)
        except Exception as exc:  # the start-up classes are the most of it: archive them anyway
            log.info("exercising the scratch Kafka failed (%r); archiving what it loaded", exc)
        proc.send_signal(signal.SIGTERM)  # a JVM that exits (not one killed) writes the archive
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # Kafka exits on SIGTERM with 143 (128 + SIGTERM) after its shutdown hooks ran.
    if code not in (0, 143) or not made.exists():
        made.unlink(missing_ok=True)
        raise StackError(f"the scratch Kafka exited {code} without an archive: {out_path.read_text()[-500:]}")
    sound, output = await maps(jvm, made, scratch)
    if not sound:
        made.unlink(missing_ok=True)
        raise StackError(f"the new archive does not map: {output}")
    made.replace(archive)
    return os.stat(archive).st_size


async def _exercise(bootstrap: str) -> None:
    """A topic, idempotent writes and a group's reads and commit: their classes go in the archive."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("cds", 2, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait("cds", b"x" * 200, key=str(i).encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "cds",
        bootstrap_servers=bootstrap,
        group_id="cds",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    # A fresh broker has no group coordinator until it made __consumer_offsets: aiokafka logs
    # "Group Coordinator Request failed ... GroupCoordinatorNotAvailableError" at ERROR (and
    # "Marking the coordinator dead") and asks again, which printed scary lines in every fresh
    # `make install`. A real failure still ends this with an exception or an empty read.
    coordinator_log = logging.getLogger("aiokafka.consumer.group_coordinator")
    level = coordinator_log.level
    coordinator_log.setLevel(logging.CRITICAL)
    try:
        await consumer.start()
        try:
            seen = 0
            deadline = time.monotonic() + 30
            while seen < 20 and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    seen += len(records)
            await consumer.commit()
        finally:
            await consumer.stop()
    finally:
        coordinator_log.setLevel(level)


__all__ = [
    "archive_flags",
    "drop",
    "drop_unless_sound",
    "ensure",
    "identity",
    "read_note",
    "should_make",
    "usable",
]
