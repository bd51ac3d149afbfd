"""Every Python package of the project is in the distribution (`pip install .`, the Docker image).

The list in pyproject.toml is explicit, and streams.archive and streams.replay were missing from
it: an editable install (make) did not notice, but the image built by infra/Dockerfile had no
archiver and no replay (`switchboard worker archiver` failed with ModuleNotFoundError).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_directory_is_distributed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("services", "streams", "schemas")
        for init in (ROOT / top).rglob("__init__.py")
        if not init.parent.relative_to(ROOT).parts[:2] == ("schemas", "switchboard")
    }
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
