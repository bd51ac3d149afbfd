"""The learned reranker: logistic regression over retrieval features, and its relevance threshold."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES: tuple[str, ...] = (
    "cosine",
    "cosine_title",
    "cosine_gap",
    "cosine_rank",
    "cosine_language_z",
    "centered",
    "centered_title",
    "centered_gap",
    "centered_language_rank",
    "bm25_log",
    "bm25_rel",
    "bm25_rank",
    "fused",
    "coverage",
    "title_coverage",
    "tag_match",
    "same_language",
    "cross_centered_gap",
    "cross_language_rank",
    "cross_own_support",
)
"""Feature order of the reranker's coefficient vector (the trainer and the index share it)."""


@dataclass(frozen=True)
class Candidate:
    """What retrieval knows about one document for one query, before reranking."""

    document_id: str
    chunk_id: str
    bm25: float
    cosine: float
    cosine_title: float
    cosine_language_z: float
    # Cosines with each language's mean vector taken out (see `_index._Matrix`): what is left is
    # mostly topic, so a Chinese article and an English question compare on what they are about.
    centered: float
    centered_title: float
    centered_language_rank: int | None
    fused: float
    bm25_rank: int | None
    cosine_rank: int | None
    coverage: float
    title_coverage: float
    tag_match: float
    same_language: float


def feature_matrix(candidates: Sequence[Candidate]) -> np.ndarray:
    """Rows of FEATURES for the candidates of one query (some features are relative to the others)."""
    if not candidates:
        return np.zeros((0, len(FEATURES)), dtype=np.float64)
    best_cos = max(c.cosine for c in candidates)
    best_centered = max(c.centered for c in candidates)
    best_bm25 = max(c.bm25 for c in candidates)
    # How well the question's own language answers it: keyword coverage of the best candidate in
    # that language. A cross-language candidate should win only when this is weak.
    own_support = max((c.coverage for c in candidates if c.same_language), default=0.0)
    rows = [
        (
            c.cosine,
            c.cosine_title,
            c.cosine - best_cos,
            0.0 if c.cosine_rank is None else 1.0 / (1.0 + c.cosine_rank),
            c.cosine_language_z,
            c.centered,
            c.centered_title,
            c.centered - best_centered,
            0.0 if c.centered_language_rank is None else 1.0 / (1.0 + c.centered_language_rank),
            math.log1p(c.bm25),
            c.bm25 / best_bm25 if best_bm25 > 0 else 0.0,
            0.0 if c.bm25_rank is None else 1.0 / (1.0 + c.bm25_rank),
            c.fused * 60.0,  # RRF with k=60: the top of one list scores ~1
            c.coverage,
            c.title_coverage,
            c.tag_match,
            c.same_language,
            (1.0 - c.same_language) * (c.centered - best_centered),
            (1.0 - c.same_language)
            * (0.0 if c.centered_language_rank is None else 1.0 / (1.0 + c.centered_language_rank)),
            (1.0 - c.same_language) * own_support,
        )
        for c in candidates
    ]
    return np.asarray(rows, dtype=np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


@dataclass(frozen=True)
class Reranker:
    """Two logistic regressions over standardised features.

    The ranker (`coef`, `intercept`) orders the candidates. The relevance model (`relevance_coef`,
    `relevance_intercept`) sees the same features plus the ranker's logit and its gap to the best
    logit, was trained on the top hits only, and says whether a hit answers the question at all;
    `threshold` on its probability is calibrated against out-of-scope questions.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    relevance_coef: np.ndarray
    relevance_intercept: float
    threshold: float
    version: str = ""
    language_means: Mapping[str, np.ndarray] = field(default_factory=dict)
    """Mean encoder vector of customer messages per language (subtracted for `centered`)."""

    @classmethod
    def untrained(cls, language_means: Mapping[str, np.ndarray] | None = None) -> Reranker:
        """Equal weights: only for bootstrapping the trainer (candidates do not depend on them)."""
        n = len(FEATURES)
        return cls(
            np.zeros(n),
            np.ones(n),
            np.ones(n),
            0.0,
            np.zeros(n + 2),
            0.0,
            0.5,
            "untrained",
            dict(language_means or {}),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reranker:
        names = tuple(data["features"])
        if names != FEATURES:
            raise ValueError(f"reranker weights are for features {names}, this code computes {FEATURES}")
        return cls(
            mean=np.asarray(data["mean"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
            coef=np.asarray(data["coef"], dtype=np.float64),
            intercept=float(data["intercept"]),
            relevance_coef=np.asarray(
                data.get("relevance_coef", [0.0] * (len(FEATURES) + 2)), dtype=np.float64
            ),
            relevance_intercept=float(data.get("relevance_intercept", 0.0)),
            threshold=float(data["threshold"]),
            version=str(data.get("version", "")),
            language_means={
                str(k): np.asarray(v, dtype=np.float32) for k, v in data.get("language_means", {}).items()
            },
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "features": list(FEATURES),
            "mean": [round(float(x), 6) for x in self.mean],
            "scale": [round(float(x), 6) for x in self.scale],
            "coef": [round(float(x), 6) for x in self.coef],
            "intercept": round(self.intercept, 6),
            "relevance_coef": [round(float(x), 6) for x in self.relevance_coef],
            "relevance_intercept": round(self.relevance_intercept, 6),
            "threshold": round(self.threshold, 4),
            "language_means": {
                k: [round(float(x), 5) for x in v] for k, v in sorted(self.language_means.items())
            },
        }

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(((features - self.mean) / self.scale) @ self.coef + self.intercept)

    def score(self, features: np.ndarray) -> np.ndarray:
        """The ranker's probability that each candidate is the answer (used to order hits)."""
        return _sigmoid(self.logits(features))

    def relevance_inputs(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        gap = logits - logits.max() if len(logits) else logits
        return np.hstack([(features - self.mean) / self.scale, logits[:, None], gap[:, None]])

    def relevance(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Probability that each candidate answers the question (compare with `threshold`)."""
        inputs = self.relevance_inputs(features, logits)
        return _sigmoid(inputs @ self.relevance_coef + self.relevance_intercept)
