"""Intent classification: a cheap char n-gram stage, then the multilingual sentence encoder.

Build the artifacts with `build_models(models_dir)` (`switchboard models build`), then
`load_intent_classifier(models_dir).classify(texts)`.
"""

from streams.assistant.intent._build import build_models
from streams.assistant.intent._cascade import CascadePolicy, StageDecision, decide_batch, needs_encoder
from streams.assistant.intent._classifier import IntentClassifier, IntentDecision, load_intent_classifier
from streams.assistant.intent._labels import LABELS
from streams.assistant.intent._text import detect_language, normalize_text

__all__ = [
    "LABELS",
    "CascadePolicy",
    "IntentClassifier",
    "IntentDecision",
    "StageDecision",
    "build_models",
    "decide_batch",
    "detect_language",
    "load_intent_classifier",
    "needs_encoder",
    "normalize_text",
]
