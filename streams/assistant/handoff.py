"""When the bot hands a conversation to a person: pure rules, no I/O.

Order of the rules (the first that fires decides the reason):
1. `customer_request`: the message asks for a person by keyword ("转人工", "人工客服", "真人",
   "talk to a human", "real person", …) or the intent is `talk_to_human`. A negated request
   ("不要转人工", "no need for a human") does not count, and overrides the intent.
2. `tenant_rule`: the intent is in the tenant's always-hand-off list, or the message contains one of
   the tenant's keywords.
3. `complaint`: the intent is `complaint` (confident enough to trust the label).
4. `low_confidence` / `unanswered`: this turn and the ones before it make `max_unresolved_turns`
   (default 2) consecutive unresolved turns. A turn is unresolved when retrieval found nothing
   relevant to answer with (greetings and thanks need no answer and never count as unanswered), or
   when it was not consulted and the intent's confidence is below the tenant's threshold. A turn
   answered from the knowledge base is resolved even when the intent model was unsure.

The queue follows the intent (complaints → "complaints", payments, refunds and invoices →
"billing", the rest → "general"), the tenant may remap it, and an intent below the confidence
threshold always goes to the default queue, since its label is not trusted.

Counters live in the conversation's state; `record_turn` folds one turn into them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TALK_TO_HUMAN = "talk_to_human"
COMPLAINT = "complaint"
# Intents that need no answer from the knowledge base.
SMALL_TALK_INTENTS = frozenset({"greeting", "thanks_goodbye"})

DEFAULT_QUEUE = "general"
DEFAULT_QUEUES: Mapping[str, str] = {
    COMPLAINT: "complaints",
    "refund": "billing",
    "payment_problem": "billing",
    "invoice": "billing",
}

REASON_CUSTOMER_REQUEST = "customer_request"
REASON_TENANT_RULE = "tenant_rule"
REASON_COMPLAINT = "complaint"
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_UNANSWERED = "unanswered"

# "人工" alone is how many Chinese customers ask for an agent, but not inside 人工智能 (AI) and the like.
_ZH_REQUEST = re.compile(r"人工(?!智能|合成|成本|费)|真人|活人|客服小姐姐|找客服|人类客服")
_ZH_NEGATION = re.compile(r"(不要|不用|不需要|别|无需|不想)(转|找|叫)?$")
_EN_REQUEST = re.compile(
    r"\b(?:(?:talk|speak|chat|connect(?:\s+me)?)\s+(?:to|with)\s+(?:a\s+|an\s+|some\s*one\s*|your\s+)?"
    r"(?:real\s+|live\s+|actual\s+)?(?:human|person|agent|representative|operator|staff)"
    r"|real\s+person|live\s+(?:agent|person|chat)|human\s+(?:agent|being|support)|customer\s+service\s+agent"
    r"|representative)\b"
    r"|^\s*(?:an?\s+)?(?:human|agent|operator|representative)(?:\s+please|\s+pls)?\s*[.!?]*\s*$",
    re.IGNORECASE,
)
_EN_NEGATION = re.compile(r"\b(?:don'?t|do\s+not|no\s+need\s+to|not)\s+(?:\w+\s+){0,3}$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class IntentDecision:
    label: str
    confidence: float


@dataclass(frozen=True, slots=True)
class HandoffHistory:
    """Consecutive unresolved turns before this one (low confidence or unanswered)."""

    consecutive_unresolved: int = 0


@dataclass(frozen=True)
class TenantHandoffRules:
    always_handoff_intents: frozenset[str] = frozenset()
    # Extra words or phrases that hand off when they appear in a message (case-insensitive).
    keywords: Sequence[str] = ()
    low_confidence_threshold: float = 0.5
    max_unresolved_turns: int = 2
    # Intent → queue, on top of DEFAULT_QUEUES.
    queues: Mapping[str, str] = field(default_factory=dict)
    default_queue: str = DEFAULT_QUEUE

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TenantHandoffRules:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"tenant handoff rules: unknown keys {unknown}; allowed: {sorted(allowed)}")
        values = dict(data)
        if "always_handoff_intents" in values:
            values["always_handoff_intents"] = frozenset(values["always_handoff_intents"])
        if "keywords" in values:
            values["keywords"] = tuple(values["keywords"])
        return cls(**values)

    def queue_for(self, intent: IntentDecision) -> str:
        if intent.confidence < self.low_confidence_threshold:
            return self.default_queue
        return self.queues.get(intent.label) or DEFAULT_QUEUES.get(intent.label) or self.default_queue


DEFAULT_RULES = TenantHandoffRules()


@dataclass(frozen=True, slots=True)
class Handoff:
    reason: str
    queue: str
    # What fired, for the log and for agents: the keyword, the intent or the counter.
    detail: str = ""


def asks_for_human(text: str) -> str | None:
    """The phrase in `text` asking for a person, or None (negated requests do not count)."""
    for pattern, negation in ((_ZH_REQUEST, _ZH_NEGATION), (_EN_REQUEST, _EN_NEGATION)):
        for match in pattern.finditer(text):
            if not negation.search(text[max(0, match.start() - 20) : match.start()]):
                return match.group(0).strip()
    return None


def declines_human(text: str) -> bool:
    """Does `text` say it does *not* want a person ("不要转人工", "I don't want to talk to a human")
    and nowhere that it does? The intent model reads the words, not the negation."""
    declined = False
    for pattern, negation in ((_ZH_REQUEST, _ZH_NEGATION), (_EN_REQUEST, _EN_NEGATION)):
        for match in pattern.finditer(text):
            if not negation.search(text[max(0, match.start() - 20) : match.start()]):
                return False
            declined = True
    return declined


def is_unresolved(
    intent: IntentDecision, answered: bool | None, rules: TenantHandoffRules = DEFAULT_RULES
) -> bool:
    """Did the bot struggle with this turn? `answered` None means retrieval has not run (no verdict).

    A turn the knowledge base answered is resolved whatever the intent model thought: a tenant's
    FAQ may cover questions outside the shop taxonomy the model was trained on (travel, telecom…),
    and those come out as low-confidence `out_of_scope`."""
    if answered:
        return False
    if intent.confidence < rules.low_confidence_threshold:
        return True
    return answered is False and intent.label not in SMALL_TALK_INTENTS


def record_turn(
    history: HandoffHistory,
    intent: IntentDecision,
    answered: bool | None,
    rules: TenantHandoffRules = DEFAULT_RULES,
) -> HandoffHistory:
    """The counters after this turn: unresolved turns add one, a resolved turn resets them."""
    if is_unresolved(intent, answered, rules):
        return HandoffHistory(history.consecutive_unresolved + 1)
    return HandoffHistory(0)


def decide_handoff(
    *,
    text: str,
    intent: IntentDecision,
    answered: bool | None,
    history: HandoffHistory = HandoffHistory(),
    rules: TenantHandoffRules = DEFAULT_RULES,
) -> Handoff | None:
    """Hand off this turn, or None to let the bot answer.

    `answered`: whether retrieval found something relevant to answer with (None if not known yet;
    call again once it is). `history` counts the turns *before* this one.
    """
    queue = rules.queue_for(intent)
    confident = intent.confidence >= rules.low_confidence_threshold

    phrase = asks_for_human(text)
    if phrase is not None:
        return Handoff(REASON_CUSTOMER_REQUEST, queue, f"keyword {phrase!r}")
    if intent.label == TALK_TO_HUMAN and confident and not declines_human(text):
        return Handoff(REASON_CUSTOMER_REQUEST, queue, f"intent {TALK_TO_HUMAN}")

    if intent.label in rules.always_handoff_intents and confident:
        return Handoff(REASON_TENANT_RULE, queue, f"intent {intent.label}")
    lowered = text.casefold()
    for keyword in rules.keywords:
        if keyword and keyword.casefold() in lowered:
            return Handoff(REASON_TENANT_RULE, queue, f"keyword {keyword!r}")

    if intent.label == COMPLAINT and confident:
        return Handoff(REASON_COMPLAINT, queue, f"intent {COMPLAINT}")

    if is_unresolved(intent, answered, rules):
        turns = history.consecutive_unresolved + 1
        if turns >= rules.max_unresolved_turns:
            reason = REASON_LOW_CONFIDENCE if not confident else REASON_UNANSWERED
            return Handoff(reason, queue, f"{turns} unresolved turns in a row")
    return None
