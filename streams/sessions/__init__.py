"""Conversation state: the pure fold and (in the worker) its Redis mirror."""

from streams.sessions._state import (
    MODE_AGENT,
    MODE_BOT,
    STATUS_CLOSED,
    STATUS_OPEN,
    ConversationState,
    FoldResult,
    fold_event,
)

__all__ = [
    "MODE_AGENT",
    "MODE_BOT",
    "STATUS_CLOSED",
    "STATUS_OPEN",
    "ConversationState",
    "FoldResult",
    "fold_event",
]
