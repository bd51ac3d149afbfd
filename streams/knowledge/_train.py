"""Train the reranker on `data/train_questions.jsonl` over the demo FAQ; writes `_weights.py`.

    .venv/bin/python -m streams.knowledge._train [--models-dir var/models]

Two models: "hybrid" (with the sentence encoder) and "keyword" (BM25 only, for an index without an
encoder). Logistic regression with L2, fitted by Newton's method in numpy; the regularisation and
the relevance threshold are chosen on out-of-fold predictions (folds by question), so the threshold
is not tuned on answers the model has already seen. The held-out questions are never read here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pprint
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np

from streams.knowledge._data import Question, load_demo_documents, load_questions
from streams.knowledge._index import KnowledgeIndex, SentenceEncoder
from streams.knowledge._rerank import FEATURES, Reranker, feature_matrix

WEIGHTS_FILE = Path(__file__).with_name("_weights.py")
FOLDS = 5
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
RELEVANCE_TOP = 3
RELEVANCE_C = 1.0


@dataclass
class _Group:
    """The candidates of one (question, intent) pair: features and which one is the answer."""

    question: int
    features: np.ndarray
    labels: np.ndarray
    in_scope: bool


def _groups(index: KnowledgeIndex, questions: Sequence[Question]) -> list[_Group]:
    groups = []
    for qi, q in enumerate(questions):
        # Each question twice: the assistant sometimes has an intent to pass, sometimes not.
        for intent in (None, q.intent):
            candidates = index._candidates(q.text, intent, None)
            labels = np.asarray([c.document_id == q.document_id for c in candidates], dtype=np.float64)
            groups.append(_Group(qi, feature_matrix(candidates), labels, q.document_id is not None))
    return groups


def _fit(
    x: np.ndarray, y: np.ndarray, c: float, balance: bool, iterations: int = 50
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (intercept not penalised) by Newton's method."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, 1.0 / c)
    penalty[-1] = 0.0
    # Positives are rare (one per group): weight them up so the boundary is not pushed to "never".
    sample = np.where(y > 0, (len(y) - y.sum()) / max(y.sum(), 1.0), 1.0) if balance else np.ones(n)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (sample * (p - y)) + penalty * w
        hess = (xb * (sample * p * (1 - p))[:, None]).T @ xb + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def _standardise(groups: list[_Group]) -> tuple[np.ndarray, np.ndarray]:
    x = np.vstack([g.features for g in groups])
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    return mean, scale


def _fit_ranker(groups: list[_Group], c: float) -> Reranker:
    mean, scale = _standardise(groups)
    x = (np.vstack([g.features for g in groups]) - mean) / scale
    y = np.concatenate([g.labels for g in groups])
    coef, intercept = _fit(x, y, c, balance=True)
    return Reranker(mean, scale, coef, intercept, np.zeros(len(FEATURES) + 2), 0.0, 0.5)


def _fit_relevance(ranker: Reranker, groups: list[_Group], logits: list[np.ndarray]) -> Reranker:
    """The relevance model on the top candidates of each group (by the ranker's logits)."""
    xs, ys = [], []
    for g, z in zip(groups, logits, strict=True):
        top = np.argsort(-z)[:RELEVANCE_TOP]
        xs.append(ranker.relevance_inputs(g.features, z)[top])
        ys.append(g.labels[top])
    coef, intercept = _fit(np.vstack(xs), np.concatenate(ys), RELEVANCE_C, balance=False)
    return replace(ranker, relevance_coef=coef, relevance_intercept=intercept)


def _folds(groups: list[_Group]) -> list[tuple[list[int], list[int]]]:
    return [
        (
            [i for i, g in enumerate(groups) if g.question % FOLDS != fold],
            [i for i, g in enumerate(groups) if g.question % FOLDS == fold],
        )
        for fold in range(FOLDS)
    ]


def _out_of_fold(groups: list[_Group], c: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each group's ranker logits and relevance from models trained without its question."""
    logits: list[np.ndarray] = [np.zeros(0)] * len(groups)
    relevance: list[np.ndarray] = [np.zeros(0)] * len(groups)
    for train_idx, test_idx in _folds(groups):
        train = [groups[i] for i in train_idx]
        ranker = _fit_ranker(train, c)
        # The relevance model learns from logits its ranker did not see (nested folds).
        inner_logits = _inner_logits(train, c)
        model = _fit_relevance(ranker, train, inner_logits)
        for i in test_idx:
            logits[i] = model.logits(groups[i].features)
            relevance[i] = model.relevance(groups[i].features, logits[i])
    return logits, relevance


def _inner_logits(groups: list[_Group], c: float) -> list[np.ndarray]:
    logits: list[np.ndarray] = [np.zeros(0)] * len(groups)
    for train_idx, test_idx in _folds(groups):
        ranker = _fit_ranker([groups[i] for i in train_idx], c)
        for i in test_idx:
            logits[i] = ranker.logits(groups[i].features)
    return logits


def _top1(groups: list[_Group], logits: list[np.ndarray]) -> float:
    answerable = [(g, z) for g, z in zip(groups, logits, strict=True) if g.in_scope]
    return sum(bool(len(z)) and g.labels[int(np.argmax(z))] > 0 for g, z in answerable) / len(answerable)


def _threshold(
    groups: list[_Group], logits: list[np.ndarray], relevance: list[np.ndarray]
) -> tuple[float, float]:
    """The cut on the top hit's relevance that best separates answerable from out-of-scope
    questions (balanced accuracy), placed in the middle of the best gap."""
    tops = [
        (float(r[int(np.argmax(z))]) if len(z) else 0.0, g.in_scope)
        for g, z, r in zip(groups, logits, relevance, strict=True)
    ]
    positives = sum(1 for _, ok in tops if ok)
    negatives = len(tops) - positives
    values = sorted({t for t, _ in tops})
    cuts = [0.0] + [(a + b) / 2 for a, b in pairwise(values)] + [1.0]
    best = (-1.0, 0.5)
    for cut in cuts:
        accepted = sum(1 for t, ok in tops if ok and t >= cut) / max(positives, 1)
        rejected = sum(1 for t, ok in tops if not ok and t < cut) / max(negatives, 1)
        balanced = (accepted + rejected) / 2
        if balanced > best[0] + 1e-12:
            best = (balanced, cut)
    return best[1], best[0]


def train(encoder: SentenceEncoder | None, version: str) -> tuple[Reranker, dict[str, float]]:
    """Fit the reranker for an index with this encoder (None: keyword only)."""
    index = KnowledgeIndex(encoder, Reranker.untrained())
    index.upsert_many(load_demo_documents())
    groups = [g for g in _groups(index, load_questions("train_questions.jsonl")) if len(g.features)]
    top1 = {c: _top1(groups, _inner_logits(groups, c)) for c in C_GRID}
    c = max(C_GRID, key=lambda k: (top1[k], -abs(np.log(k))))
    logits, relevance = _out_of_fold(groups, c)
    threshold, balanced = _threshold(groups, logits, relevance)
    ranker = _fit_ranker(groups, c)
    model = _fit_relevance(ranker, groups, _inner_logits(groups, c))
    model = replace(model, threshold=threshold, version=version)
    return model, {"C": c, "oof_top1": round(top1[c], 4), "oof_balanced_relevance": round(balanced, 4)}


def _encoder_version(models_dir: Path) -> str:
    manifest = models_dir / "manifest.json"
    if manifest.exists():
        outputs = json.loads(manifest.read_text())["stages"]["encoder"]["outputs"]
        return str(outputs["sentence_encoder.onnx"]["sha256"])[:12]
    return "unknown"


def _write(weights: dict[str, dict[str, object]]) -> None:
    body = pprint.pformat(weights, width=100, sort_dicts=False)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    WEIGHTS_FILE.write_text(
        '"""Reranker weights. Generated by `python -m streams.knowledge._train`; do not edit by hand."""\n\n'
        "from typing import Any\n\n"
        f"# features: {', '.join(FEATURES)}; content digest {digest}\n"
        f"WEIGHTS: dict[str, dict[str, Any]] = {body}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=Path("var/models"))
    args = parser.parse_args()

    from streams.assistant.encoder import load_encoder

    encoder = load_encoder(args.models_dir)
    weights = {}
    for name, enc in (("hybrid", encoder), ("keyword", None)):
        version = f"{name}-lr-enc{_encoder_version(args.models_dir)}" if enc else f"{name}-lr"
        model, stats = train(enc, version)
        weights[name] = model.to_dict()
        print(f"{name}: {stats}, threshold {model.threshold:.3f}")
        for feature, coef in zip(FEATURES, model.coef, strict=True):
            print(f"    {feature:18} {coef:+.3f}")
    _write(weights)
    print(f"wrote {WEIGHTS_FILE}")


if __name__ == "__main__":
    main()
