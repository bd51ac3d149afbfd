"""When a Kafka that died starting with the class-data archive drops it (services/stack/_cds.py):
the check's verdicts, without a JVM (`maps` is replaced; its real runs are in
tests/integration/test_kafka_cds.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.settings import Settings, load_settings
from services.stack import _cds
from services.stack._layout import Layout


@pytest.fixture
def made(tmp_path: Path) -> tuple[Settings, Path, Path]:
    """A stack with an archive and its note, as `install` leaves them (in tmp_path, whatever
    SWITCHBOARD_KAFKA_INSTALL_DIR the caller's environment names)."""
    settings = load_settings(data_dir=tmp_path, kafka_version="4.1.2", kafka_install_dir=tmp_path / "kafka")
    libs = Layout.of(settings).kafka_libs("4.1.2")
    libs.mkdir(parents=True)
    archive = Layout.of(settings).kafka_cds_archive("4.1.2")
    archive.write_bytes(b"x" * 1000)
    _cds._write_note(archive, {"identity": _cds.identity(sys.executable, libs), "size": 1000})
    return settings, libs, archive


def verdicts(monkeypatch: pytest.MonkeyPatch, *results: bool) -> list[Path | None]:
    """`maps` answers `results` in turn; the archives it was asked about (None: the control)."""
    asked: list[Path | None] = []
    answers = iter(results)

    async def maps(jvm: list[str], archive: Path | None, cwd: Path) -> tuple[bool, str]:
        asked.append(archive)
        return next(answers), "output"

    monkeypatch.setattr(_cds, "maps", maps)
    return asked


def usable(settings: Settings, libs: Path, archive: Path) -> bool:
    return _cds.usable(_cds.read_note(archive), _cds.identity(sys.executable, libs), archive.stat().st_size)


async def test_an_archive_that_checks_is_kept_until_it_survived_max_kept_deaths(
    made: tuple[Settings, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, libs, archive = made
    verdicts(monkeypatch, *[True] * _cds.MAX_KEPT_DEATHS)
    for death in range(1, _cds.MAX_KEPT_DEATHS):
        assert not await _cds.drop_unless_sound(settings, ["java"], sys.executable, libs, "died")
        assert usable(settings, libs, archive)
        assert _cds.read_note(archive)["kept_deaths"] == death  # type: ignore[index]
    assert await _cds.drop_unless_sound(settings, ["java"], sys.executable, libs, "died")
    assert not archive.exists()
    note = _cds.read_note(archive)
    assert note is not None and "it checks" in note["failed"]


async def test_a_failed_check_drops_it_only_if_the_jvm_starts_without_it(
    made: tuple[Settings, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, libs, archive = made
    # The check fails, and so does the same JVM without the archive (memory short): no verdict.
    asked = verdicts(monkeypatch, False, False)
    assert not await _cds.drop_unless_sound(settings, ["java"], sys.executable, libs, "died")
    assert asked == [archive, None] and usable(settings, libs, archive)
    # The check fails and the JVM starts without it: the archive is what kills it.
    verdicts(monkeypatch, False, True)
    assert await _cds.drop_unless_sound(settings, ["java"], sys.executable, libs, "died")
    assert not archive.exists()


async def test_an_archive_made_again_during_the_check_is_not_judged_by_it(
    made: tuple[Settings, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, libs, archive = made

    async def maps(jvm: list[str], checked: Path | None, cwd: Path) -> tuple[bool, str]:
        if checked is None:
            return True, "output"  # the control: the JVM starts without an archive
        # Another stack sharing the install replaces the archive while this one's check runs.
        fresh = archive.with_name("fresh")
        fresh.write_bytes(b"y" * 1000)
        fresh.replace(archive)
        return False, "output"

    monkeypatch.setattr(_cds, "maps", maps)
    assert not await _cds.drop_unless_sound(settings, ["java"], sys.executable, libs, "died")
    assert archive.read_bytes() == b"y" * 1000
