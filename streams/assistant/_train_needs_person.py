"""Fit the "needs a person" probe: logistic regression over the sentence encoder's vectors.

    .venv/bin/python -m streams.assistant._train_needs_person [--models-dir var/models]

Writes `streams/assistant/data/needs_person.json` (the weights are committed, as the reranker's are;
the encoder is deterministic). Positives: the intent training messages labelled talk_to_human or
complaint, and the hand-off messages of the shop question sets written before 2026-12-04 14:00
(`benchmarks/data/shop_unseen_questions.jsonl`, `shop_holdout2…7_questions.jsonl`: those sets are
therefore no longer held out for hand-offs). Negatives: every other intent training message, those
sets' other messages, and the demo FAQ's titles. The regularisation and the threshold are chosen
on out-of-fold predictions: the threshold is the lowest at which at most MAX_FALSE_SHARE of the
negatives would be handed off. `benchmarks/data/shop_holdout8_questions.jsonl` and the telecom set
are never read here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from services.settings import PROJECT_ROOT
from streams.assistant.encoder import load_encoder
from streams.assistant.needs_person import WEIGHTS_FILE
from streams.knowledge import load_demo_documents
from streams.knowledge._text import to_simplified

MODELS_DIR = PROJECT_ROOT / "var" / "models"

INTENT_TRAIN = PROJECT_ROOT / "streams" / "assistant" / "intent" / "data" / "train.jsonl"
POSITIVE_INTENTS = frozenset({"talk_to_human", "complaint"})
QUESTION_SETS = tuple(
    PROJECT_ROOT / "benchmarks" / "data" / name
    for name in (
        "shop_unseen_questions.jsonl",
        "shop_holdout2_questions.jsonl",
        "shop_holdout3_questions.jsonl",
        "shop_holdout4_questions.jsonl",
        "shop_holdout5_questions.jsonl",
        "shop_holdout6_questions.jsonl",
        "shop_holdout7_questions.jsonl",
    )
)
# Written for this probe alone, by a helper that read only the FAQ (no question set, no rule):
# incidents, crises, harassment, fraud, legal threats and escalations without the rules' words, and
# look-alikes in benign senses, ordinary questions and refusals of a person.
EXTRA = PROJECT_ROOT / "streams" / "assistant" / "data" / "needs_person_extra.jsonl"
# At most this share of the negatives (out of fold) may be handed off by the probe alone.
MAX_FALSE_SHARE = 0.005
C_GRID = (0.3, 1.0, 3.0, 10.0)


def _rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def examples() -> tuple[list[str], np.ndarray]:
    texts: list[str] = []
    labels: list[int] = []
    for row in _rows(INTENT_TRAIN):
        texts.append(str(row["text"]))
        labels.append(int(row["label"] in POSITIVE_INTENTS))
    for path in QUESTION_SETS:
        for row in _rows(path):
            texts.append(str(row["question"]))
            labels.append(int(row.get("expect") == "handoff"))
    if EXTRA.exists():
        for row in _rows(EXTRA):
            texts.append(str(row["text"]))
            labels.append(int(bool(row["needs_person"])))
    for document in load_demo_documents():
        texts.append(document.title)
        labels.append(0)
    return texts, np.asarray(labels)


def _threshold(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The lowest threshold handing off at most MAX_FALSE_SHARE of the negatives; its recall."""
    negatives = np.sort(proba[y == 0])[::-1]
    allowed = int(MAX_FALSE_SHARE * len(negatives))
    threshold = float(negatives[allowed]) + 1e-6
    return threshold, float(np.mean(proba[y == 1] >= threshold))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    args = parser.parse_args()
    encoder = load_encoder(args.models_dir)
    texts, y = examples()
    x = encoder.encode([to_simplified(t) for t in texts])
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=7)
    best: tuple[float, float, float] | None = None
    for c in C_GRID:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        proba = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
        threshold, recall = _threshold(proba, y)
        print(f"C={c}: out-of-fold recall {recall:.3f} at threshold {threshold:.3f}")
        if best is None or recall > best[1]:
            best = (c, recall, threshold)
    assert best is not None
    c, recall, threshold = best
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x, y)
    weights = {
        "version": f"needs-person-lr-C{c:g}-n{len(texts)}",
        "coef": [round(float(v), 6) for v in model.coef_[0]],
        "intercept": round(float(model.intercept_[0]), 6),
        "threshold": round(threshold, 4),
        "out_of_fold_recall": round(recall, 3),
        "max_false_share": MAX_FALSE_SHARE,
        "examples": {"positive": int(y.sum()), "negative": int(len(y) - y.sum())},
    }
    WEIGHTS_FILE.write_text(json.dumps(weights) + "\n", encoding="utf-8")
    print(f"C={c}, threshold {threshold:.3f}, out-of-fold recall {recall:.3f}: wrote {WEIGHTS_FILE}")


if __name__ == "__main__":
    main()
