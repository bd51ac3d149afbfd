"""The cascade's decision logic: pure functions over probability arrays, no model I/O.

The n-gram stage scores every message. Messages whose top n-gram probability reaches the threshold
are decided there; the others go to the encoder stage, whose probabilities are blended with the
n-gram ones (the two make different mistakes, so the blend beats either alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NGRAM = "ngram"
ENCODER = "encoder"


@dataclass(frozen=True)
class CascadePolicy:
    """`ngram_threshold` > 1 sends every message to the encoder; <= 0 never does."""

    ngram_threshold: float
    encoder_weight: float = 0.5


@dataclass(frozen=True)
class StageDecision:
    label_index: int
    confidence: float
    stage: str


def needs_encoder(ngram_proba: np.ndarray, policy: CascadePolicy) -> np.ndarray:
    """Indices of the messages the n-gram stage is not confident about."""
    if ngram_proba.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(ngram_proba.max(axis=1) < policy.ngram_threshold)


def blend(ngram_proba: np.ndarray, encoder_proba: np.ndarray, policy: CascadePolicy) -> np.ndarray:
    w = policy.encoder_weight
    return w * encoder_proba + (1.0 - w) * ngram_proba


def decide_batch(
    ngram_proba: np.ndarray,
    encoder_proba_for: Callable[[np.ndarray], np.ndarray],
    policy: CascadePolicy,
) -> list[StageDecision]:
    """Decide every message; `encoder_proba_for(indices)` is called once, for the unsure ones only."""
    decisions = [StageDecision(int(row.argmax()), float(row.max()), NGRAM) for row in np.asarray(ngram_proba)]
    unsure = needs_encoder(ngram_proba, policy)
    if unsure.size:
        combined = blend(ngram_proba[unsure], encoder_proba_for(unsure), policy)
        for i, row in zip(unsure, combined, strict=True):
            decisions[int(i)] = StageDecision(int(row.argmax()), float(row.max()), ENCODER)
    return decisions
