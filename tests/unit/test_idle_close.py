"""The idle-close sweeper's pure decisions (services/ingress/_idle.py)."""

from __future__ import annotations

import json

from services.auth._model import Registry, Status, TenantRecord
from services.ingress._idle import CLOSE, FORGET, folded_partition, idle_after_s, last_activity_ms, verdict
from services.settings import Settings


def state(status: str = "open", updated_ms: int = 10_000) -> bytes:
    return json.dumps({"status": status, "updated_at_ns": updated_ms * 1_000_000}).encode()


def test_a_conversation_idle_since_before_the_cutoff_is_closed_and_a_recent_one_updates_the_index() -> None:
    assert verdict(state(updated_ms=10_000), False, cutoff_ms=10_000) == CLOSE
    assert verdict(state(updated_ms=10_001), False, cutoff_ms=10_000) == 10_001
    # Closed already (by the ingress's mark, or in the folded state): dropped from the index.
    assert verdict(state(updated_ms=1), True, cutoff_ms=10_000) == FORGET
    assert verdict(state("closed", 1), False, cutoff_ms=10_000) == FORGET
    # No state yet: left alone.
    assert verdict(None, False, cutoff_ms=10_000) == 0
    assert last_activity_ms(state(updated_ms=42)) == 42 and last_activity_ms(state("closed")) is None


def test_the_idle_time_is_the_tenants_own_else_the_default_and_zero_is_off() -> None:
    settings = Settings(idle_close_after_s=3600)
    registry = Registry()
    registry.tenants["own"] = TenantRecord("own", Status.ACTIVE, settings={"idle_close_after_s": 5})
    registry.tenants["off"] = TenantRecord("off", Status.ACTIVE, settings={"idle_close_after_s": 0})
    assert idle_after_s(registry, settings, "own") == 5
    assert idle_after_s(registry, settings, "off") == 0
    assert idle_after_s(registry, settings, "other") == 3600
    assert idle_after_s(None, settings, "other") == 3600


def test_a_candidates_partition_comes_from_its_state() -> None:
    # A candidate is closed only when its partition's fold is current (test_idle_close_lag.py).
    assert folded_partition(json.dumps({"status": "open", "last_partition": 3}).encode()) == 3
    assert folded_partition(None) == -1
    assert folded_partition(json.dumps({"status": "open"}).encode()) == -1
