"""The assistant: intent, retrieval-grounded answers through the model gateway, and handoff."""
