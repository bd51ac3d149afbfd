"""The assistant's indexing queue serves tenants in turns, and knowledge upserts cost rate-limit
tokens by size (issue 9, fair use)."""

from __future__ import annotations

from switchboard.v1 import knowledge_pb2

from services.auth._limits import COSTED, cost_of
from streams.knowledge._fair import FairQueue

UPSERT = "/switchboard.v1.KnowledgeService/UpsertDocuments"


def drain(queue: FairQueue[str]) -> list[tuple[str, list[str]]]:
    turns = []
    while (turn := queue.take()) is not None:
        turns.append((turn.tenant_id, [item for _, item in turn.work]))
    return turns


def test_a_tenant_with_one_document_waits_at_most_one_turn_of_a_backlog() -> None:
    queue: FairQueue[str] = FairQueue(turn_documents=4, turn_bytes=1 << 20)
    for i in range(100):
        queue.put("a", f"a{i}", f"a{i}", 10)
    first = queue.take()
    assert first is not None and first.tenant_id == "a" and len(first.work) == 4
    # B's document arrives while A's first turn is being indexed: it goes before A's second.
    queue.put("b", "b0", "b0", 10)
    second = queue.take()
    assert second is not None and (second.tenant_id, second.work) == ("b", [("b0", "b0")])
    rest = drain(queue)
    assert {t for t, _ in rest} == {"a"} and sum(len(w) for _, w in rest) == 96
    assert len(queue) == 0


def test_tenants_alternate_and_a_turn_is_bounded_by_bytes_but_takes_at_least_one() -> None:
    queue: FairQueue[str] = FairQueue(turn_documents=10, turn_bytes=100)
    for i in range(3):
        queue.put("a", f"a{i}", f"a{i}", 60)
        queue.put("b", f"b{i}", f"b{i}", 500)  # each alone is over the byte bound
    assert len(queue) == 6
    assert drain(queue) == [
        ("a", ["a0"]),
        ("b", ["b0"]),
        ("a", ["a1"]),
        ("b", ["b1"]),
        ("a", ["a2"]),
        ("b", ["b2"]),
    ]


def test_a_later_event_of_a_queued_document_replaces_it() -> None:
    queue: FairQueue[str | None] = FairQueue()
    queue.put("a", "doc", "v1", 10)
    queue.put("a", "other", "x", 10)
    queue.put("a", "doc", None, 0)  # deleted before it was indexed
    assert len(queue) == 2 and queue.pending("a") == 2
    turn = queue.take()
    assert turn is not None and turn.work == [("doc", None), ("other", "x")]  # in its place
    # Work for the tenant whose turn was just taken joins its remaining queue.
    queue.put("a", "late", "y", 10)
    assert queue.pending("a") == 1 and len(queue) == 1
    turn = queue.take()
    assert turn is not None and turn.work == [("late", "y")]
    assert queue.take() is None


def test_an_upsert_costs_a_token_per_document_and_per_started_8_kib() -> None:
    assert UPSERT in COSTED and "/switchboard.v1.KnowledgeService/DeleteDocument" in COSTED
    small = knowledge_pb2.Document(document_id="d", title="t", body="short")
    large = knowledge_pb2.Document(document_id="e", title="t", body="x" * (20 * 1024))
    request = knowledge_pb2.UpsertDocumentsRequest(documents=[small, small, large])
    assert cost_of(UPSERT, request) == 1 + 1 + 3
    assert (
        cost_of("/switchboard.v1.KnowledgeService/DeleteDocument", knowledge_pb2.DeleteDocumentRequest()) == 1
    )


def test_a_document_updated_while_queued_keeps_its_place_and_is_not_starved() -> None:
    # A sync job adds documents while one of them is edited every turn (a CMS autosaving it):
    # moved to the back at every update, it waited behind every document added since, and was
    # not indexed for as long as the job ran.
    queue: FairQueue[str] = FairQueue(turn_documents=2, turn_bytes=1 << 20)
    queue.put("a", "edited", "v0", 10)
    for i in range(4):
        queue.put("a", f"d{i}", "new", 10)
    taken: list[str] = []
    for n in range(1, 4):
        turn = queue.take()
        assert turn is not None
        taken += [f"{d}={item}" for d, item in turn.work]
        queue.put("a", "edited", f"v{n}", 10)
        queue.put("a", f"d{2 + 2 * n}", "new", 10)
        queue.put("a", f"d{3 + 2 * n}", "new", 10)
    # Its first turn took it (as its latest version then); each later version takes the place
    # of the one before it while queued.
    assert taken[0] == "edited=v0"
    assert any(t.startswith("edited=v") and t != "edited=v0" for t in taken[1:]), taken


def test_the_queue_counts_the_bytes_it_holds_and_knows_what_it_holds() -> None:
    # The follower bounds its read-ahead by these (streams/assistant/_worker.py READ_AHEAD_*).
    queue: FairQueue[str] = FairQueue(turn_documents=2, turn_bytes=1 << 20)
    queue.put("a", "a0", "v1", 100)
    queue.put("a", "a1", "v1", 50)
    queue.put("b", "b0", "v1", 7)
    queue.put("a", "a0", "v2", 30)  # replaces a0's work: its size too
    assert (len(queue), queue.bytes) == (3, 87)
    assert ("a", "a0") in queue and ("b", "b0") in queue and ("b", "a0") not in queue
    turn = queue.take()
    assert turn is not None and turn.work == [("a0", "v2"), ("a1", "v1")]
    assert (len(queue), queue.bytes) == (1, 7) and ("a", "a0") not in queue
    queue.put("a", "a0", "v3", 10)  # arrives for the tenant whose turn was just taken
    assert ("a", "a0") in queue and queue.bytes == 17
    assert drain(queue) == [("b", ["v1"]), ("a", ["v3"])]
    assert (len(queue), queue.bytes) == (0, 0)
