"""Indexing work queued per tenant and served in turns (pure; the assistant's follower drives it).

The follower used to index knowledge-events in log order, a fetched batch at a time: a few hundred
upserts of one tenant held up every other tenant's documents until all of them were embedded
(minutes on a loaded machine). Now each tenant has its own queue, and tenants take turns: a turn
is at most `turn_documents` documents or about `turn_bytes` of them (always at least one), then
the next tenant with work goes. A document that arrives for a tenant with nothing queued waits
for at most the turn in progress plus one turn of each other tenant that has work.

Within a tenant, work is keyed by document id: a later upsert or delete of a document replaces
one still queued, in its place (the last event of an id wins, as in the compacted log), so the
queue holds at most one entry per document and its memory is bounded by the documents themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

TURN_DOCUMENTS = 32
"""Documents one tenant's turn takes at most (one batched encoder call)."""
TURN_BYTES = 64 * 1024
"""...and about this much of them (a turn always takes one, however large)."""


@dataclass(frozen=True, slots=True)
class Turn(Generic[T]):
    tenant_id: str
    work: list[tuple[str, T]]  # (document id, what to do with it), in arrival order


class FairQueue(Generic[T]):
    """Per-tenant queues of work by document id, served round-robin."""

    def __init__(self, turn_documents: int = TURN_DOCUMENTS, turn_bytes: int = TURN_BYTES) -> None:
        if turn_documents < 1 or turn_bytes < 1:
            raise ValueError("a turn must allow at least one document and one byte")
        self.turn_documents = turn_documents
        self.turn_bytes = turn_bytes
        # Tenant -> its work (document id -> (item, size)); dict order is the round's order.
        self._tenants: dict[str, dict[str, tuple[T, int]]] = {}
        # The tenant whose turn was taken last and what it has left: it goes to the back of the
        # round only at the next `take`, behind tenants whose work arrived during its turn.
        self._held: tuple[str, dict[str, tuple[T, int]]] | None = None
        self._size = 0
        self._bytes = 0

    def put(self, tenant_id: str, document_id: str, item: T, size: int) -> None:
        """Queue work for a document, replacing work for it still queued in its place (were it
        moved to the back at every update, a document edited more often than its tenant's queue
        drains would never be indexed)."""
        if self._held is not None and self._held[0] == tenant_id:
            pending = self._held[1]
        else:
            pending = self._tenants.setdefault(tenant_id, {})
        if document_id in pending:
            self._bytes -= pending[document_id][1]
        else:
            self._size += 1
        size = max(0, size)
        self._bytes += size
        pending[document_id] = (item, size)  # an existing key keeps its place

    def take(self) -> Turn[T] | None:
        """The next tenant's turn, or None when nothing is queued."""
        if self._held is not None:
            tenant_id, pending = self._held
            self._held = None
            if pending:
                self._tenants[tenant_id] = pending
        if not self._tenants:
            return None
        tenant_id = next(iter(self._tenants))
        pending = self._tenants.pop(tenant_id)
        work: list[tuple[str, T]] = []
        total = 0
        while pending and len(work) < self.turn_documents:
            document_id = next(iter(pending))
            item, size = pending[document_id]
            if work and total + size > self.turn_bytes:
                break
            del pending[document_id]
            work.append((document_id, item))
            total += size
        self._size -= len(work)
        self._bytes -= total
        self._held = (tenant_id, pending)
        return Turn(tenant_id, work)

    def __len__(self) -> int:
        """Documents queued, over every tenant."""
        return self._size

    @property
    def bytes(self) -> int:
        """The sizes of the documents queued, summed (what the follower bounds its read-ahead by)."""
        return self._bytes

    def __contains__(self, key: object) -> bool:
        """Whether work for a (tenant, document id) is queued."""
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        tenant_id, document_id = key
        if self._held is not None and self._held[0] == tenant_id and document_id in self._held[1]:
            return True
        return document_id in self._tenants.get(tenant_id, ())

    def documents(self) -> set[tuple[str, str]]:
        """(tenant, document id) of every document queued."""
        queued = {(t, d) for t, pending in self._tenants.items() for d in pending}
        if self._held is not None:
            queued.update((self._held[0], d) for d in self._held[1])
        return queued

    def pending(self, tenant_id: str) -> int:
        if self._held is not None and self._held[0] == tenant_id:
            return len(self._held[1])
        return len(self._tenants.get(tenant_id, ()))
