"""An incremental BM25 index over chunks (add and remove without a rebuild)."""

from __future__ import annotations

import math
from collections import Counter

from streams.knowledge._text import tokenize


class BM25Index:
    """Okapi BM25 with postings kept per term; documents are chunks keyed by chunk id."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self._postings: dict[str, dict[str, int]] = {}
        self._lengths: dict[str, int] = {}
        self._terms: dict[str, tuple[str, ...]] = {}
        self._total_length = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def __contains__(self, key: str) -> bool:
        return key in self._lengths

    def add(self, key: str, text: str) -> None:
        if key in self._lengths:
            self.remove(key)
        counts = Counter(tokenize(text))
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[key] = tf
        length = sum(counts.values())
        self._lengths[key] = length
        self._terms[key] = tuple(counts)
        self._total_length += length

    def remove(self, key: str) -> None:
        length = self._lengths.pop(key, None)
        if length is None:
            return
        self._total_length -= length
        for term in self._terms.pop(key):
            posting = self._postings[term]
            del posting[key]
            if not posting:
                del self._postings[term]

    def idf(self, term: str) -> float:
        df = len(self._postings.get(term, ()))
        n = len(self._lengths)
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> dict[str, float]:
        """BM25 score of every chunk sharing a term with the query (others score 0)."""
        n = len(self._lengths)
        if n == 0:
            return {}
        avg_length = self._total_length / n or 1.0
        k1, b = self.k1, self.b
        result: dict[str, float] = {}
        for term, qtf in Counter(tokenize(query)).items():
            posting = self._postings.get(term)
            if not posting:
                continue
            idf = self.idf(term)
            for key, tf in posting.items():
                norm = k1 * (1.0 - b + b * self._lengths[key] / avg_length)
                result[key] = result.get(key, 0.0) + qtf * idf * tf * (k1 + 1.0) / (tf + norm)
        return result
