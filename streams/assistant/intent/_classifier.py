"""IntentClassifier: the two-stage cascade on onnxruntime (n-gram stage, then the sentence encoder)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from streams.assistant.encoder import SentenceEncoder, load_encoder, session_options
from streams.assistant.intent._cascade import CascadePolicy, decide_batch
from streams.assistant.intent._text import detect_language, normalize_text
from streams.knowledge._text import to_simplified

NGRAM_FILE = "intent_ngram.onnx"
HEAD_FILE = "intent_encoder_head.onnx"
META_FILE = "intent_meta.json"
# The n-gram graph materialises a dense (batch x vocabulary) TF-IDF matrix; small chunks keep it
# in cache, which is faster per message than one large batch.
_NGRAM_CHUNK = 16


@dataclass(frozen=True)
class IntentDecision:
    label: str
    confidence: float
    stage: str  # "ngram" | "encoder"
    model_version: str
    language: str  # "zh" | "en"


class IntentClassifier:
    """Classify customer messages into the shop taxonomy; synchronous, batched, CPU-bound.

    Callers on an event loop run `classify` in an executor. Thread-safe; one instance per process.
    """

    def __init__(
        self,
        ngram: ort.InferenceSession,
        head: ort.InferenceSession,
        encoder: SentenceEncoder,
        labels: Sequence[str],
        policy: CascadePolicy,
        model_version: str,
    ) -> None:
        self._ngram = ngram
        self._head = head
        self._encoder = encoder
        self.labels = tuple(labels)
        self.policy = policy
        self.model_version = model_version
        self._lock = threading.Lock()

    def classify(self, texts: Sequence[str]) -> list[IntentDecision]:
        """One decision per text, in order."""
        if not texts:
            return []
        ngram_proba = self.ngram_proba(texts)
        decisions = decide_batch(
            ngram_proba, lambda idx: self.encoder_proba([texts[i] for i in idx]), self.policy
        )
        return [
            IntentDecision(
                label=self.labels[d.label_index],
                confidence=round(d.confidence, 6),
                stage=d.stage,
                model_version=self.model_version,
                language=detect_language(text),
            )
            for d, text in zip(decisions, texts, strict=True)
        ]

    def ngram_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n, labels) probabilities of the char n-gram stage."""
        norm = [normalize_text(t) for t in texts]
        parts = []
        with self._lock:
            for start in range(0, len(norm), _NGRAM_CHUNK):
                chunk = np.array(norm[start : start + _NGRAM_CHUNK], dtype=object)
                parts.append(self._ngram.run(["probabilities"], {"text": chunk})[0])
        return np.vstack(parts).astype(np.float32)

    def encoder_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n, labels) probabilities of the encoder stage's head."""
        embeddings = self._encoder.encode([to_simplified(t) for t in texts])
        with self._lock:
            (proba,) = self._head.run(["probabilities"], {"embedding": embeddings})
        return np.asarray(proba, dtype=np.float32)


def load_intent_classifier(
    models_dir: Path, encoder: SentenceEncoder | None = None, policy: CascadePolicy | None = None
) -> IntentClassifier:
    """Load the cascade built under `models_dir`; pass `encoder` to share one encoder session."""
    models_dir = Path(models_dir)
    meta_path = models_dir / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"intent model metadata missing: {meta_path}; run `switchboard models build`")
    meta = json.loads(meta_path.read_text())
    opts = session_options()
    providers = ["CPUExecutionProvider"]
    ngram = ort.InferenceSession(str(models_dir / NGRAM_FILE), sess_options=opts, providers=providers)
    head = ort.InferenceSession(str(models_dir / HEAD_FILE), sess_options=opts, providers=providers)
    return IntentClassifier(
        ngram=ngram,
        head=head,
        encoder=encoder or load_encoder(models_dir),
        labels=meta["labels"],
        policy=policy or CascadePolicy(**meta["policy"]),
        model_version=meta["model_version"],
    )
