"""Where Kafka's install lives (Settings.kafka_install_dir) and `install`'s fast path: a stack whose
shared install is ready takes no lock (services/stack/_install.py)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest

from services.settings import Settings, load_settings
from services.stack import install
from services.stack._components import KAFKA_LIBS_MARKER
from services.stack._layout import Layout


def test_an_empty_variable_means_under_the_data_directory_not_the_current_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SWITCHBOARD_KAFKA_INSTALL_DIR", "")
    monkeypatch.setenv("SWITCHBOARD_MODELS_DIR", " ")
    settings = Settings(data_dir=tmp_path)
    assert settings.kafka_install_dir is None and settings.models_dir is None
    assert Layout.of(settings).kafka_libs("4.1.2") == tmp_path.resolve() / "kafka" / "libs-4.1.2"
    assert settings.effective_models_dir == tmp_path / "models"


def test_a_named_install_dir_holds_the_jars_and_archive_and_nothing_else(tmp_path: Path) -> None:
    layout = Layout.of(load_settings(data_dir=tmp_path / "data", kafka_install_dir=tmp_path / "shared"))
    assert layout.kafka_libs("4.1.2") == (tmp_path / "shared" / "libs-4.1.2").resolve()
    assert layout.kafka_cds_archive("4.1.2").parent == (tmp_path / "shared").resolve()
    assert layout.kafka_log_dir == (tmp_path / "data" / "kafka" / "data").resolve()
    assert layout.kafka_config.parent == (tmp_path / "data" / "kafka").resolve()


async def test_a_ready_shared_install_is_used_without_taking_its_lock(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    libs = shared / "libs-4.1.2"
    libs.mkdir(parents=True)
    (libs / KAFKA_LIBS_MARKER).write_text("4.1.2\n")
    settings = load_settings(
        data_dir=tmp_path / "data", kafka_install_dir=shared, kafka_version="4.1.2", kafka_cds=False
    )
    lock = Layout.of(settings).kafka_install_lock
    # Another stack holds the install directory's lock (it is making something there).
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        await asyncio.wait_for(install(settings), 5.0)
    finally:
        os.close(fd)
