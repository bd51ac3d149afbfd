"""The model gateway: one interface for answerers, adapters behind it."""
