"""When the bot hands a conversation to a person: pure rules, no I/O.

Order of the rules (the first that fires decides the reason):
1. `customer_request`: the message asks for a person by keyword ("转人工", "人工客服", "真人",
   "talk to a human", "real person", …) or the intent is `talk_to_human`. A refused person
   ("不要转人工", "no need for a human", "I don't want to talk to an agent") does not count, and
   overrides the intent; any other negation near a request ("you are not helping, talk to an
   agent", "why not talk to a human") leaves the request standing.
2. `tenant_rule`: the intent is in the tenant's always-hand-off list, or the message contains one of
   the tenant's keywords.
3. `complaint`: the intent is `complaint` (confident enough to trust the label), or the message
   carries a sign of an angry or escalating customer whatever its intent: a threat to report, sue,
   dispute the charge or review ("12315", "charge back", "1 star"), a charge of fraud ("骗子",
   "scam"), a demand for a manager, a repeated contact ("第三次联系", "third time I'm writing"),
   abuse or strong anger words ("垃圾商家", "ridiculous", "worst service ever"). The intent model
   reads the topic of "太气人了，退款申请了一个月还没到账" (refund, 0.79), not the anger; an angry
   customer goes to a person even when the bot could answer the question.
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
# A Chinese refusal sits right before the request, at most with "帮我/再" and a verb between
# (不要转人工, 不需要帮我转人工, 别找客服), or right after it (人工就不用了). A bare 不 only with a
# verb, and not in 要不 (how about), 能不/可不 (can't) or an A-not-A question (转不转人工).
_ZH_REFUSED_BEFORE = re.compile(
    r"(?:(?:不要|不用|不需要|不必|别|无需|不想|没必要|用不着)(?:帮我|给我|替我|再|去)?"
    r"|(?<![要能可是行转找叫])不)(?:转接|转到|转给|转|找|叫|接|联系)?$"
)
_ZH_REFUSED_AFTER = re.compile(r"(?:客服)?\s*(?:就|也|先|暂时|还是)?(?:不用|不需要|不必|没必要|免了)")
_EN_REQUEST = re.compile(
    r"\b(?:(?:talk|speak|chat|connect(?:\s+me)?)\s+(?:to|with)\s+(?:a\s+|an\s+|some\s*one\s*|your\s+)?"
    r"(?:real\s+|live\s+|actual\s+)?(?:human|person|agent|representative|operator|staff)"
    r"|real\s+person|live\s+(?:agent|person|chat)|human\s+(?:agent|being|support)|customer\s+service\s+agent"
    r"|representative)\b"
    r"|^\s*(?:an?\s+)?(?:human|agent|operator|representative)(?:\s+please|\s+pls)?\s*[.!?]*\s*$",
    re.IGNORECASE,
)
# An English refusal: a negation governing the wanting, needing or asking for a person or the
# talking to one ("I don't want to talk to a human", "no need for an agent", "do not transfer me
# to a person", "I'm not asking for a real person"), or "no human please". The chain from the
# negation to the person admits only those words, so an unrelated "not" a few words before a
# request ("you are not helping me talk to an agent", "is it not possible to talk to a person?")
# refuses nothing. Where it is unclear, the customer gets a person: a needless hand-off costs less
# than one refused ("I did not talk to an agent yet" is a fact, not a refusal).
_EN_PERSON = (
    r"(?:(?:a|an|the|any|your|some|one\s+of\s+your)\s+)?"
    r"(?:(?:real|live|actual|human|customer\s+service|support)\s+)?"
    r"(?:humans?|persons?|people|agents?|representatives?|reps?|operators?|staff"
    r"|some\s*one|some\s*body|any\s*one|any\s*body)\b(?!['’]s)"
)
_EN_WANT = (
    r"(?:(?:want|wanna|need|wish|like|care|require)(?:\s+(?:to|for))?"
    r"|ask(?:ing)?\s+for|request(?:ing)?|interested\s+in|looking\s+for|have\s+to)"
)
_EN_CONTACT = (
    r"(?:(?:talk|speak|chat)\w*(?:\s+(?:to|with))?"
    r"|(?:be\s+|being\s+|get\s+)?(?:transferred|connected|put\s+through|passed|handed(?:\s+over)?"
    r"|sent|escalated)\s+(?:to|with)"
    r"|(?:transfer|connect|put|pass|hand|send|escalate|route)\w*\s+(?:(?:me|this|it|us)\s+)?"
    r"(?:(?:through|over|on)\s+)?(?:to|with)"
    r"|bother)"
)
_EN_REFUSAL = re.compile(
    # "don't/do not/not/never (really) want/need/ask for (to talk to)" or "don't talk to"...
    r"\b(?:(?:do(?:es)?\s*n[o'’]?t|won[’']?t|will\s+not|would\s*n[o'’]?t|not|never)\s+"
    r"(?:(?:really|even|actually|necessarily|particularly|ever)\s+)?"
    rf"(?:{_EN_WANT}\s+(?:{_EN_CONTACT}\s+)?|{_EN_CONTACT}\s+)"
    # ..."no need to talk to", "no need for"...
    rf"|no\s+(?:need|reason)\s+(?:to\s+{_EN_CONTACT}|for|of)\s+)"
    # ...a person; or "no human please".
    + _EN_PERSON
    + r"|\bno\s+(?:(?:real|live|actual|human)\s+)?"
    r"(?:humans?|persons?|people|agents?|operators?|representatives?|staff)\b"
    r"(?=\s*(?:please|pls|thanks|thank\s+you|needed|necessary|required|[,.;!]|$))",
    re.IGNORECASE,
)
# A negation after these is a suggestion, a complaint or a fact, not a refusal ("why not talk to a
# human", "why don't you connect me to an agent", "I could not talk to a person", "I did not talk
# to an agent yet").
_EN_NOT_A_REFUSAL_AFTER = re.compile(r"\b(?:why|can|could|did|have|has|had)\s*$", re.IGNORECASE)


# Signs of an angry or escalating customer (rule 3), whatever the message is about. Each is
# specific enough not to fire on a plain question: no bare 垃圾 (垃圾袋 is a product), 工商 (工商银行
# is a bank), 报警 (报警器), 经理 (客户经理), "manager" (password manager), "worst" (worst case).
_ZH_COMPLAINT = re.compile(
    r"投诉|12315|消协|消费者协会|工商局|市场监管|曝光(?:你们|你家|这家|商家)|差评"
    r"|骗子(?!短信|电话|网站|链接|邮件)|骗人|骗钱|欺骗|坑人|被坑|坑爹|黑店|垃圾(?!袋|桶|分类|篓|箱|处理|清理|短信|邮件)"
    r"|气死|气人|火大|恼火|过分|离谱|恶心|什么破|破服务|破玩意|破东西|无语|受够"
    r"|(?<!客户)经理|主管|律师|起诉|法院|报警(?!器)"
    r"|没完没了|这事没完|有没有人管|没人管|没人理|不理人|给我(?:一)?个说法|要(?:一)?个说法"
    r"|再也不(?:买|来|会)"
    r"|第[二三四五六七八九十几\d]+次(?:联系|找|问|打|催|反映|咨询|说)"
    r"|(?:催|问|找|联系|打)了(?:好几|很多|无数|[三四五六七八九十\d]+)(?:次|遍|回)"
)
_EN_COMPLAINT = re.compile(
    r"\b(?:"
    r"worst\s+(?:\w+\s+)?(?:service|experience|company|store|shop|support|seller|purchase|website|app)"
    r"|worst\b[^.?!\n]{0,30}\bever"
    r"|ridiculous|unacceptable|outrageous|disgusting|disgraceful|pathetic|appalling|horrible\s+service"
    r"|terrible\s+(?:service|experience|support|company|store|shop)|furious|livid|infuriat\w*"
    r"|pissed(?:\s+off)?|fed\s+up|sick\s+(?:and\s+tired\s+)?of|so\s+done\s+with"
    r"|you(?:\s+people|\s+guys)?(?:\s+are|['’]re)\s+(?:so\s+|completely\s+|totally\s+|absolutely\s+)?useless"
    r"|useless\s+(?:bot|service|support|company|store|shop|people|customer\s+service)"
    # Scam and fraud as a charge against the shop, not a question about one ("report a scam text").
    r"|scammers?|scammed|fraudsters?|(?:is|are|what)\s+(?:a\s+)?(?:total\s+|complete\s+)?(?:scam|fraud)"
    r"|rip(?:ped)?[\s-]?off|con\s+artists?|thie(?:f|ves)"
    r"|lawyers?|attorneys?|sue\s+(?:you|your)|legal\s+action|small\s+claims"
    r"|report(?:ing)?\s+(?:you|this|your\s+\w+)\s+to|consumer\s+(?:protection|rights|council|affairs)"
    r"|better\s+business\s+bureau|trading\s+standards|charge\s*backs?"
    r"|dispute\s+(?:the|this|a|my)\s+(?:charge|payment|transaction)"
    r"|(?:1|one)[\s-]star|(?:bad|negative|terrible)\s+review"
    r"|(?<!password\s)(?:manager|supervisor)s?"
    r"|file\s+a\s+complaint|formal\s+complaint|lodge\s+a\s+complaint"
    r"|never\s+(?:again\s+)?(?:order|buy|shop|purchas)\w*\s+(?:anything\s+)?(?:from|with|here|at)\s+(?:you|this|your)"
    r"|never\s+again"
    r"|(?:third|3rd|fourth|4th|fifth|5th|\d+th)\s+time\s+(?:(?:that\s+)?i(?:['’]m|\s+am|\s+have|['’]ve)?\s+)?"
    r"(?:ask|writ|contact|call|email|messag|chat|tell|explain|reach|complain)\w*"
    r"|(?:nobody|no\s+one|no-one)\s+(?:\w+\s+)?(?:answers?|replies|replied|responds?|responded|gets?\s+back"
    r"|got\s+back|helps?|helped|cares?|cared)"
    r"|wtf|wth|what\s+the\s+(?:hell|heck|fuck)|fuck\w*|bullshit|shit\w*"
    r")\b",
    re.IGNORECASE,
)


def complaint_marker(text: str) -> str | None:
    """The words in `text` that show an angry or escalating customer (rule 3), or None."""
    match = _ZH_COMPLAINT.search(text) or _EN_COMPLAINT.search(text)
    return match.group(0) if match else None


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


def _requests(text: str) -> tuple[list[tuple[str, bool]], bool]:
    """Each phrase in `text` asking for a person, with whether it is refused; and whether the text
    refuses a person anywhere (also without a request phrase: "I don't need a human")."""
    requests: list[tuple[str, bool]] = []
    refused_anywhere = False
    for match in _ZH_REQUEST.finditer(text):
        refused = bool(
            _ZH_REFUSED_BEFORE.search(text[max(0, match.start() - 8) : match.start()])
            or _ZH_REFUSED_AFTER.match(text, match.end())
        )
        refused_anywhere |= refused
        requests.append((match.group(0), refused))
    refusals = [
        m.span() for m in _EN_REFUSAL.finditer(text) if not _EN_NOT_A_REFUSAL_AFTER.search(text[: m.start()])
    ]
    refused_anywhere |= bool(refusals)
    for match in _EN_REQUEST.finditer(text):
        refused = any(start <= match.start() < end for start, end in refusals)
        requests.append((match.group(0).strip(), refused))
    return requests, refused_anywhere


def asks_for_human(text: str) -> str | None:
    """The phrase in `text` asking for a person, or None (refused persons do not count)."""
    return next((phrase for phrase, refused in _requests(text)[0] if not refused), None)


def declines_human(text: str) -> bool:
    """Does `text` refuse a person ("不要转人工", "I don't want to talk to a human", "no need for a
    person") and nowhere ask for one? The intent model reads the words, not the negation."""
    requests, refused_anywhere = _requests(text)
    return refused_anywhere and all(refused for _, refused in requests)


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
    marker = complaint_marker(text)
    if marker is not None:
        # A confident intent routes as usual (an angry refund is billing's); an unsure one is
        # not trusted, and the complaint is the one thing known.
        complaints = rules.queue_for(IntentDecision(COMPLAINT, 1.0))
        return Handoff(REASON_COMPLAINT, queue if confident else complaints, f"keyword {marker!r}")

    if is_unresolved(intent, answered, rules):
        turns = history.consecutive_unresolved + 1
        if turns >= rules.max_unresolved_turns:
            reason = REASON_LOW_CONFIDENCE if not confident else REASON_UNANSWERED
            return Handoff(reason, queue, f"{turns} unresolved turns in a row")
    return None
