"""Train the two intent stages on `data/train.jsonl` and export them to ONNX (build time only).

- n-gram stage: char 1-4-gram TF-IDF + multinomial logistic regression (skl2onnx);
- encoder stage: logistic regression on the 512-d sentence embeddings (skl2onnx).

The cascade's parameters (n-gram confidence threshold, blend weight) are chosen by grouped 5-fold
cross-validation on the training set only; `heldout.jsonl` is never read here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from streams.assistant.encoder import load_encoder
from streams.assistant.intent._cascade import CascadePolicy, decide_batch
from streams.assistant.intent._classifier import HEAD_FILE, META_FILE, NGRAM_FILE
from streams.assistant.intent._labels import LABELS
from streams.assistant.intent._text import normalize_text

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
TRAIN_FILE = DATA_DIR / "train.jsonl"
BUILD_VERSION = 1

NGRAM_C = 10.0
HEAD_C = 10.0
BLEND_WEIGHTS = (0.4, 0.5, 0.6, 0.7)
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.30, 0.96, 0.05))
# How much cross-validated accuracy the cascade may give up against running the encoder on
# every message, in exchange for skipping it on confident messages.
ACCURACY_TOLERANCE = 0.003


def intent_stage_inputs() -> dict[str, Any]:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in ("_build_intent.py", "_text.py", "_cascade.py", "_labels.py"):
        digest.update((here / name).read_bytes())
    return {
        "build_version": BUILD_VERSION,
        "train.jsonl": hashlib.sha256(TRAIN_FILE.read_bytes()).hexdigest(),
        "code": digest.hexdigest(),
        "scikit-learn": _version("scikit-learn"),
        "skl2onnx": _version("skl2onnx"),
    }


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def load_examples(path: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = {r["label"] for r in rows} - set(LABELS)
    if unknown:
        raise ValueError(f"{path}: labels outside the taxonomy: {sorted(unknown)}")
    return rows


def _groups(texts: list[str]) -> np.ndarray:
    """Cross-validation groups: a message and its decorated variants ("亲，" + t + "？") share one."""
    core = [re.sub(r"[\W_]+", "", t.lower()) for t in texts]
    by_core: dict[str, int] = {}
    order = sorted(range(len(texts)), key=lambda i: len(core[i]))
    groups = np.empty(len(texts), dtype=np.int64)
    for i in order:
        c = core[i]
        match = next((g for base, g in by_core.items() if len(base) >= 4 and base in c), None)
        if match is None:
            match = len(by_core)
            by_core[c] = match
        groups[i] = match
    return groups


def _ngram_model() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    # sublinear_tf is not reproduced by skl2onnx's TF-IDF converter: plain counts keep ONNX exact.
    return make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 4), lowercase=False, dtype=np.float32),
        LogisticRegression(C=NGRAM_C, max_iter=3000),
    )


def _head_model() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=HEAD_C, max_iter=3000)


def _choose_policy(
    norm: list[str], embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> tuple[CascadePolicy, dict[str, Any]]:
    from sklearn.model_selection import GroupKFold

    n_labels = len(LABELS)
    p_ngram = np.zeros((len(norm), n_labels), dtype=np.float32)
    p_head = np.zeros((len(norm), n_labels), dtype=np.float32)
    for train_idx, test_idx in GroupKFold(n_splits=5).split(norm, labels, groups):
        ngram = _ngram_model().fit([norm[i] for i in train_idx], labels[train_idx])
        p_ngram[test_idx] = _aligned(ngram.predict_proba([norm[i] for i in test_idx]), ngram.classes_)
        head = _head_model().fit(embeddings[train_idx], labels[train_idx])
        p_head[test_idx] = _aligned(head.predict_proba(embeddings[test_idx]), head.classes_)
    truth = np.array([LABELS.index(y) for y in labels])

    def accuracy(policy: CascadePolicy) -> tuple[float, float]:
        decisions = decide_batch(p_ngram, lambda idx: p_head[idx], policy)
        correct = np.mean([d.label_index == t for d, t in zip(decisions, truth, strict=True)])
        share = np.mean([d.stage == "ngram" for d in decisions])
        return float(correct), float(share)

    # Blend weight first, with the encoder on every message; then the highest n-gram share whose
    # accuracy stays within the tolerance.
    full = {w: accuracy(CascadePolicy(ngram_threshold=1.01, encoder_weight=w))[0] for w in BLEND_WEIGHTS}
    weight = max(full, key=lambda w: full[w])
    curve = {t: accuracy(CascadePolicy(ngram_threshold=t, encoder_weight=weight)) for t in THRESHOLDS}
    eligible = [t for t, (acc, _) in curve.items() if acc >= full[weight] - ACCURACY_TOLERANCE]
    threshold = min(eligible) if eligible else 1.01
    report = {
        "cv_accuracy_encoder_on_all": {str(w): round(a, 4) for w, a in full.items()},
        "cv_ngram_only_accuracy": round(float(np.mean(p_ngram.argmax(1) == truth)), 4),
        "cv_head_only_accuracy": round(float(np.mean(p_head.argmax(1) == truth)), 4),
        "cv_threshold_curve": {
            str(t): {"accuracy": round(a, 4), "ngram_share": round(s, 4)} for t, (a, s) in curve.items()
        },
        "tolerance": ACCURACY_TOLERANCE,
    }
    return CascadePolicy(ngram_threshold=float(threshold), encoder_weight=float(weight)), report


def _aligned(proba: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = np.zeros((proba.shape[0], len(LABELS)), dtype=np.float32)
    for j, c in enumerate(classes):
        out[:, LABELS.index(c)] = proba[:, j]
    return out


def _export(model: Any, input_name: str, input_type: Any, path: Path) -> None:
    from skl2onnx import to_onnx

    final = model[-1] if hasattr(model, "steps") else model
    onx = to_onnx(
        model,
        initial_types=[(input_name, input_type)],
        options={id(final): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(onx.SerializeToString())
    tmp.replace(path)


def _check_onnx(path: Path, feed: dict[str, np.ndarray], expected: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, proba = session.run(None, feed)
    diff = float(np.abs(np.asarray(proba) - expected).max())
    if diff > 1e-4:
        raise RuntimeError(f"{path.name}: ONNX probabilities differ from scikit-learn by {diff}")
    return diff


def train_intent(models_dir: Path) -> None:
    """Train both stages, export them and write `intent_meta.json` (labels, policy, version)."""
    import warnings

    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    rows = load_examples(TRAIN_FILE)
    texts = [r["text"] for r in rows]
    norm = [normalize_text(t) for t in texts]
    labels = np.array([r["label"] for r in rows])
    embeddings = load_encoder(models_dir).encode(texts)

    policy, cv_report = _choose_policy(norm, embeddings, labels, _groups(texts))

    ngram = _ngram_model().fit(norm, labels)
    head = _head_model().fit(embeddings, labels)
    if list(ngram.classes_) != list(LABELS) or list(head.classes_) != list(LABELS):
        raise RuntimeError("training data must cover every label (classes are sorted like LABELS)")
    with warnings.catch_warnings():
        # skl2onnx warns that only word tokenizers are "fully supported"; _check_onnx proves ours.
        warnings.simplefilter("ignore", UserWarning)
        _export(ngram, "text", StringTensorType([None]), models_dir / NGRAM_FILE)
    _export(head, "embedding", FloatTensorType([None, embeddings.shape[1]]), models_dir / HEAD_FILE)
    ngram_diff = _check_onnx(
        models_dir / NGRAM_FILE, {"text": np.array(norm, dtype=object)}, ngram.predict_proba(norm)
    )
    head_diff = _check_onnx(models_dir / HEAD_FILE, {"embedding": embeddings}, head.predict_proba(embeddings))

    version_src = hashlib.sha256(TRAIN_FILE.read_bytes() + json.dumps(intent_stage_inputs()).encode())
    meta = {
        "model_version": f"intent-{version_src.hexdigest()[:12]}",
        "labels": list(LABELS),
        "policy": {"ngram_threshold": policy.ngram_threshold, "encoder_weight": policy.encoder_weight},
        "training_examples": len(rows),
        "ngram_vocabulary": len(ngram[0].vocabulary_),
        "onnx_max_abs_diff": {"ngram": ngram_diff, "encoder_head": head_diff},
        "cross_validation": cv_report,
    }
    (models_dir / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    log.info("intent models built: %s, policy %s", meta["model_version"], meta["policy"])
