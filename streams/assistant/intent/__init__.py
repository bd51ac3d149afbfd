"""Intent classification: a cheap char n-gram stage, then the multilingual sentence encoder."""

from streams.assistant.intent._build import build_models

__all__ = ["build_models"]
