"""Intent cascade on the held-out split: per-language macro-F1, per-stage share/accuracy, latency.

Trains nothing: loads the artifacts `switchboard models build` wrote (default var/models) and
reads streams/assistant/intent/data/heldout.jsonl, which no build step ever reads.

    .venv/bin/python benchmarks/intent_eval.py [--models-dir var/models]
    .venv/bin/python benchmarks/intent_eval.py --questions benchmarks/data/shop_unseen_questions.jsonl

`--questions` also scores a knowledge question set's gold intents ("question", "language",
"intent" per line), and how many are confident enough (>= 0.5) for retrieval to use the label.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from streams.assistant.intent import LABELS, CascadePolicy, decide_batch, load_intent_classifier

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "streams" / "assistant" / "intent" / "data" / "heldout.jsonl"


def macro_f1(truth: list[str], pred: list[str]) -> float:
    scores = []
    for label in sorted(set(truth)):
        tp = sum(t == p == label for t, p in zip(truth, pred, strict=True))
        fp = sum(p == label != t for t, p in zip(truth, pred, strict=True))
        fn = sum(t == label != p for t, p in zip(truth, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def per_message_ms(fn: Callable[[list[str]], object], texts: list[str], batch: int) -> float:
    fn(texts[:batch])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i : i + batch])
    return (time.perf_counter() - started) * 1000 / len(texts)


def extra_set(clf: object, path: Path) -> None:
    """Intent accuracy on a knowledge question set, per language, and the share of trusted labels."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("intent")]
    decisions = clf.classify([r["question"] for r in rows])  # type: ignore[attr-defined]
    print(f"\n== {path.name}: {len(rows)} messages with a gold intent ==")
    for lang in ("zh", "en"):
        idx = [i for i, r in enumerate(rows) if r["language"] == lang]
        if not idx:
            continue
        right = [decisions[i].label == rows[i]["intent"] for i in idx]
        trusted = [decisions[i].confidence >= 0.5 for i in idx]
        right_trusted = [r for r, t in zip(right, trusted, strict=True) if t]
        print(
            f"{lang}: accuracy {np.mean(right):.3f} (n={len(idx)}); confidence >= 0.5: {np.mean(trusted):.3f}, "
            f"accuracy of those {np.mean(right_trusted) if right_trusted else float('nan'):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "var" / "models")
    parser.add_argument("--questions", type=Path, help="also score this question set's gold intents")
    args = parser.parse_args()

    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [r["text"] for r in rows]
    truth = [r["label"] for r in rows]
    langs = [r["lang"] for r in rows]
    clf = load_intent_classifier(args.models_dir)
    meta = json.loads((args.models_dir / "intent_meta.json").read_text())

    decisions = clf.classify(texts)
    pred = [d.label for d in decisions]
    print(f"model {clf.model_version}; held-out {len(rows)} messages; policy {clf.policy}")
    print(
        f"language detection accuracy: {np.mean([d.language == g for d, g in zip(decisions, langs, strict=True)]):.3f}"
    )

    print("\n== cascade (as deployed) ==")
    for lang in ("zh", "en"):
        idx = [i for i, g in enumerate(langs) if g == lang]
        f1 = macro_f1([truth[i] for i in idx], [pred[i] for i in idx])
        acc = np.mean([truth[i] == pred[i] for i in idx])
        print(f"{lang}: macro-F1 {f1:.3f}  accuracy {acc:.3f}  (n={len(idx)})")
    for stage in ("ngram", "encoder"):
        idx = [i for i, d in enumerate(decisions) if d.stage == stage]
        acc = np.mean([truth[i] == pred[i] for i in idx]) if idx else float("nan")
        print(f"stage {stage:7s}: share {len(idx) / len(rows):.3f}  accuracy {acc:.3f}  (n={len(idx)})")

    # The same probabilities under other policies, to show what the threshold buys.
    p_ngram = clf.ngram_proba(texts)
    p_encoder = clf.encoder_proba(texts)
    print("\n== alternatives on the same held-out messages ==")
    alternatives = {
        "n-gram only": CascadePolicy(ngram_threshold=0.0, encoder_weight=clf.policy.encoder_weight),
        "encoder+blend on every message": CascadePolicy(1.01, clf.policy.encoder_weight),
        "encoder head only": CascadePolicy(1.01, 1.0),
    }
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        alternatives[f"threshold {t}"] = CascadePolicy(t, clf.policy.encoder_weight)
    for name, policy in alternatives.items():
        ds = decide_batch(p_ngram, lambda idx: p_encoder[idx], policy)
        alt = [LABELS[d.label_index] for d in ds]
        share = np.mean([d.stage == "ngram" for d in ds])
        f1s = []
        for lang in ("zh", "en"):
            idx = [i for i, g in enumerate(langs) if g == lang]
            f1s.append(macro_f1([truth[i] for i in idx], [alt[i] for i in idx]))
        print(f"{name:32s} zh {f1s[0]:.3f}  en {f1s[1]:.3f}  n-gram share {share:.2f}")

    print("\n== worst confusions (truth -> predicted) ==")
    confusions = Counter((t, p) for t, p in zip(truth, pred, strict=True) if t != p)
    for (want, got), n in confusions.most_common(10):
        examples = [texts[i] for i in range(len(rows)) if truth[i] == want and pred[i] == got][:2]
        print(f"{n:3d}  {want} -> {got}   e.g. {examples}")

    print("\n== latency per message (1 intra-op thread) ==")
    for batch in (1, 32):
        ng = per_message_ms(clf.ngram_proba, texts, batch)
        enc = per_message_ms(lambda ts: clf.encoder_proba(ts), texts, batch)
        full = per_message_ms(clf.classify, texts, batch)
        print(
            f"batch {batch:2d}: n-gram stage {ng:.3f} ms  encoder stage {enc:.3f} ms  cascade {full:.3f} ms"
        )

    if args.questions:
        extra_set(clf, args.questions)

    cv = meta.get("cross_validation", {})
    print(
        f"\nthreshold {clf.policy.ngram_threshold} / encoder weight {clf.policy.encoder_weight} were chosen at build time "
        "by grouped 5-fold cross-validation on train.jsonl (never on this split): the blend weight with the best "
        "accuracy when the encoder sees every message, then the lowest n-gram threshold whose accuracy stays within "
        f"{cv.get('tolerance')} of it, i.e. the largest share of messages that can skip the encoder for free."
    )


if __name__ == "__main__":
    main()
