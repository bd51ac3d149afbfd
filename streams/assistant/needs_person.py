"""Does a message need a person? A linear probe over the sentence encoder's vector.

The hand-off rules (streams/assistant/handoff.py) are phrases; each blind held-out set found about
a third of its hand-offs worded past them ("can someone actually look at this", 找个能做主的来,
a courier's harassment, a crisis told in other words). The encoder places such messages near the
ones the rules were written from, in either language, so a logistic regression over its 512-d
vector (fitted by `streams/assistant/_train_needs_person.py` on the intent training messages, the
earlier question sets and `data/needs_person_extra.jsonl`; weights in `data/needs_person.json`)
catches what the phrases miss. Its threshold hands off at most 0.5% of the ordinary messages it was
fitted on (out of fold). It only adds hand-offs (decide_handoff's `needs_person`), after every rule,
when the FAQ has nothing to answer with, and not for a message with a negation shortly before a
person or a hand-over (`handoff.negates_a_person`: the probe reads 不要转给别人 as wanting one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WEIGHTS_FILE = Path(__file__).resolve().parent / "data" / "needs_person.json"


@dataclass(frozen=True)
class NeedsPersonProbe:
    version: str
    coef: np.ndarray
    intercept: float
    threshold: float

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """One probability per row of `embeddings` (the encoder's vectors of the messages)."""
        if embeddings.shape[-1] != self.coef.shape[0]:
            raise ValueError(
                f"needs-person probe: vectors of {embeddings.shape[-1]} dims, weights of {self.coef.shape[0]}"
            )
        logits = np.asarray(embeddings, dtype=np.float64) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def verdicts(self, embeddings: np.ndarray) -> list[str | None]:
        """Per row: what the probe says when the message needs a person (its version and
        probability, decide_handoff's `needs_person`), else None."""
        return [
            f"{self.version} {p:.2f}" if p >= self.threshold else None for p in self.probabilities(embeddings)
        ]


def load_probe(path: Path = WEIGHTS_FILE, dims: int = 512) -> NeedsPersonProbe:
    """The shipped weights; a file that is not what `_train_needs_person` writes (another width
    than the encoder's, a value that is not finite, a threshold outside (0, 1)) raises ValueError
    here, at the assistant's start, not in every batch."""
    data = json.loads(path.read_text(encoding="utf-8"))
    probe = NeedsPersonProbe(
        version=str(data["version"]),
        coef=np.asarray(data["coef"], dtype=np.float64),
        intercept=float(data["intercept"]),
        threshold=float(data["threshold"]),
    )
    if probe.coef.shape != (dims,) or not np.all(np.isfinite(probe.coef)) or not np.isfinite(probe.intercept):
        raise ValueError(
            f"needs-person probe {path}: expected {dims} finite weights, got shape {probe.coef.shape}"
        )
    if not 0.0 < probe.threshold < 1.0:
        raise ValueError(f"needs-person probe {path}: threshold {probe.threshold} is not within (0, 1)")
    return probe
