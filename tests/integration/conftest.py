"""Integration tests use the fixtures of tests/conftest.py (one real stack per session, shared
with tests/soak); these names are re-exported for the tests that import them from here."""

from tests.conftest import (
    TEST_ENV,
    System,
    count,
    eventually,
    start_conversation,
    wait_for_count,
)

__all__ = ["TEST_ENV", "System", "count", "eventually", "start_conversation", "wait_for_count"]
