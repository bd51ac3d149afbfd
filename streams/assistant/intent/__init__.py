"""Intent classification: a cheap char n-gram stage, then the multilingual sentence encoder."""
