"""Retrieval evaluation shared by the trainer and `benchmarks/retrieval.py`.

Besides the questions as written, an FAQ with articles in both languages yields two harder
scenarios for free, by leaving documents out of the index:

- *twin removed*: a question's own-language article is left out, so only its other-language twin
  (same id after the `zh-`/`en-` prefix) answers it: a cross-language question;
- *answer removed*: both are left out, so nothing answers it, while the neighbouring articles
  (same topic, other details) are still there: the hardest kind of out-of-scope question.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from streams.knowledge._data import Question
from streams.knowledge._document import Document
from streams.knowledge._index import Hit, KnowledgeIndex, SentenceEncoder

_PREFIXES = ("zh-", "en-")
T = TypeVar("T")


class CachingEncoder:
    """Remembers every text's vector: scenarios rebuild indexes from the same few texts."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        self.encoder = encoder
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, vector in zip(missing, self.encoder.encode(missing), strict=True):
                self._cache[text] = np.asarray(vector, dtype=np.float32)
        if not texts:
            return np.zeros((0, 512), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


def twin_of(document_id: str, documents: Iterable[str]) -> str | None:
    """The other-language version of an article, by the `zh-`/`en-` id convention."""
    for mine, other in (_PREFIXES, _PREFIXES[::-1]):
        if document_id.startswith(mine):
            twin = other + document_id[len(mine) :]
            return twin if twin in set(documents) else None
    return None


@dataclass(frozen=True)
class Case:
    """One question against one index: the document that should come first (None: nothing should)."""

    question: Question
    expected: str | None
    excluded: frozenset[str]
    cross_language: bool
    scenario: str


def cases(
    documents: Sequence[Document], questions: Sequence[Question], scenarios: Sequence[str]
) -> list[Case]:
    """Cases of the named scenarios: "asked" (as written), "twin removed", "answer removed"."""
    languages = {d.document_id: d.language for d in documents}
    ids = list(languages)
    out: list[Case] = []
    for q in questions:
        if "asked" in scenarios:
            cross = q.document_id is not None and languages[q.document_id] != q.language
            out.append(Case(q, q.document_id, frozenset(), cross, "asked"))
        if q.document_id is None or languages[q.document_id] != q.language:
            continue
        twin = twin_of(q.document_id, ids)
        if twin is None:
            continue
        if "twin removed" in scenarios:
            out.append(Case(q, twin, frozenset({q.document_id}), True, "twin removed"))
        if "answer removed" in scenarios:
            out.append(Case(q, None, frozenset({q.document_id, twin}), False, "answer removed"))
    return out


def run_cases(
    documents: Sequence[Document],
    cases_: Sequence[Case],
    make_index: Callable[[], KnowledgeIndex],
    search: Callable[[KnowledgeIndex, Case], T],
) -> list[T]:
    """`search(index, case)` for every case, on an index of the documents minus the case's exclusions
    (one index per distinct exclusion set, built once)."""
    by_excluded: dict[frozenset[str], list[int]] = defaultdict(list)
    for i, case in enumerate(cases_):
        by_excluded[case.excluded].append(i)
    results: dict[int, T] = {}
    for excluded, members in by_excluded.items():
        index = make_index()
        index.upsert_many(d for d in documents if d.document_id not in excluded)
        for i in members:
            results[i] = search(index, cases_[i])
    return [results[i] for i in range(len(cases_))]


@dataclass
class Metrics:
    """Ranking quality over answerable cases and answer/reject decisions over all cases."""

    ranks: dict[str, list[int | None]] = field(default_factory=lambda: defaultdict(list))
    # Decisions on the top hit: answered with the right document, with a wrong one, or rejected.
    right: int = 0
    wrong_answered: int = 0
    rejected_answerable: int = 0
    out_of_scope: int = 0
    out_of_scope_answered: int = 0
    misses: list[str] = field(default_factory=list)

    def add(self, case: Case, hits: Sequence[Hit]) -> None:
        q = case.question
        top_relevant = bool(hits) and hits[0].relevant
        if case.expected is None:
            self.out_of_scope += 1
            if top_relevant:
                self.out_of_scope_answered += 1
                self.misses.append(
                    f"  [{case.scenario}] out of scope answered: {q.text!r} -> {hits[0].document_id}"
                )
            return
        ids = [h.document_id for h in hits]
        rank = ids.index(case.expected) if case.expected in ids else None
        groups = ["all", q.language] + (["cross-language"] if case.cross_language else [])
        for g in groups:
            self.ranks[g].append(rank)
        if not top_relevant:
            self.rejected_answerable += 1
        elif rank == 0:
            self.right += 1
        else:
            self.wrong_answered += 1
        if rank != 0:
            got = f"{ids[0]} ({hits[0].scores.rerank:.2f})" if ids else "nothing"
            self.misses.append(
                f"  [{case.scenario}] {q.text!r}: want {case.expected} at rank {rank}, got {got}"
            )

    @property
    def answerable(self) -> int:
        return len(self.ranks.get("all", []))

    def top1(self, group: str = "all") -> float:
        rows = self.ranks.get(group, [])
        return sum(r == 0 for r in rows) / len(rows) if rows else 0.0

    def mrr(self, group: str = "all") -> float:
        rows = self.ranks.get(group, [])
        return sum(1.0 / (r + 1) for r in rows if r is not None) / len(rows) if rows else 0.0

    def recall(self, group: str = "all", k: int = 5) -> float:
        rows = self.ranks.get(group, [])
        return sum(r is not None and r < k for r in rows) / len(rows) if rows else 0.0

    def rates(self) -> dict[str, float]:
        """false_negative: answerable, rejected; false_positive: out of scope, answered;
        wrong_answer: answerable, answered from the wrong document; right: answered correctly."""
        n, m = max(self.answerable, 1), max(self.out_of_scope, 1)
        return {
            "right": self.right / n,
            "wrong_answer": self.wrong_answered / n,
            "false_negative": self.rejected_answerable / n,
            "false_positive": self.out_of_scope_answered / m,
        }
