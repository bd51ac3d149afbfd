"""What goes into the gateway and what comes out of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

LANGUAGES = ("zh", "en")


@dataclass(frozen=True, slots=True)
class GroundingPassage:
    """One retrieved chunk the answer may be grounded on; `score` is retrieval's, higher is better."""

    document_id: str
    chunk_id: str
    title: str
    text: str
    score: float
    language: str


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    """A question to answer. `passages` are the relevant hits, best first; empty when nothing matched."""

    question: str
    language: str
    passages: Sequence[GroundingPassage] = ()
    intent: str = ""
    tenant_id: str = ""
    # Only for logs and error messages.
    conversation_id: str = ""
    # With no passages: titles of articles the knowledge base matched, though not closely enough
    # to answer from (best first); the reply asks whether the customer meant one of them.
    suggestions: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Citation:
    document_id: str
    chunk_id: str
    score: float


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One try of one adapter, kept on the Answer for logs and metrics."""

    adapter: str
    outcome: str  # "ok", "error", "timeout", "interrupted", "skipped_open_circuit"
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Answer:
    """The finished reply. `text` is authoritative: it equals the deltas after the last restart."""

    text: str
    citations: tuple[Citation, ...]
    adapter: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    first_token_ms: int
    grounded: bool
    language: str
    attempts: tuple[AttemptRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplyDelta:
    """A piece of the reply as it streams.

    `index` grows by one per delta over the whole reply and is never reused. `restart` is True on
    the first delta after a fallback that happened mid-stream: the client drops every earlier delta
    of this reply and starts the text again from this one.
    """

    index: int
    text: str
    restart: bool = False


@dataclass(slots=True)
class Draft:
    """What an adapter reports about the text it streams; filled in while and after it streams."""

    model: str
    citations: list[Citation] = field(default_factory=list)
    grounded: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Answerer(Protocol):
    """An adapter behind the gateway.

    `generate` is an async generator of text deltas. It fills `draft` (model, citations,
    grounded, token counts) by the time it is exhausted, and raises `AdapterError` on failure.
    Timeouts, retries, circuit breaking and fallback are the gateway's, not the adapter's.
    """

    @property
    def name(self) -> str: ...

    def generate(self, request: AnswerRequest, draft: Draft) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...
