"""A customer's answer to the bot's "did you mean …?": pure rules, no I/O.

When nothing was relevant enough to answer from, the bot offers up to two close titles ("Did you
mean “Exchanging an item…”? Ask me about it…" / "您是想问「…」吗？"). Customers answer such a
question the way they would answer a person: "yes", "是的", "the second one", "嗯 第一个". Read as
a new question, "yes" matched nothing and counted as one more unanswered turn (two of them hand
off). `accepted_offer` says which offered title such a reply takes; anything longer or different
(a new question, "no", "connect me to a person") is not an answer to the offer and goes the usual
way.
"""

from __future__ import annotations

import re
import unicodedata

from streams.knowledge._text import fold_for_rules

_YES = (
    r"(?:yes|yeah|yea|yep|yup|ya|yes\s+please|sure|correct|right|exactly|indeed|i\s+did|i\s+do"
    r"|that(?:['’]s|\s+is)?\s+(?:it|right|the\s+one|correct)|that\s+one|this\s+one"
    r"|是的?|对的?|嗯+|恩+|是啊|是呀|对啊|对呀|对滴|没错|就是(?:这个|它|那个)?|正是|对头|是这个|对对+)"
)
_FIRST = (
    r"(?:(?:the\s+)?(?:first|1st)(?:\s+one)?|(?:number|no\.?|#|option)?\s*(?:1|one)\)?|\(1\)"
    r"|第(?:一|1)个?|前者|前面那个|①|1\ufe0f?\u20e3)"
)
_SECOND = (
    r"(?:(?:the\s+)?(?:second|2nd|last)(?:\s+one)?|(?:number|no\.?|#|option)?\s*(?:2|two)\)?|\(2\)"
    r"|第(?:二|2)个?|后者|后面那个|二|②|2\ufe0f?\u20e3)"
)
_POLITE = r"(?:please|pls|plz|thanks|thank\s+you|thx|ok|okay|请|谢谢|麻烦了|吧|呢|啊|呀|哦|哈)"
_SEP = r"[\s,，.。!！~～、:：;；]*"
_REPLY = re.compile(
    rf"^{_SEP}(?:(?P<yes>{_YES}){_SEP})*(?:(?:就是|就|我要|i\s+mean|it'?s)?\s*(?:(?P<first>{_FIRST})|(?P<second>{_SECOND})))?"
    rf"{_SEP}(?:{_POLITE}{_SEP})*(?:(?P<yes_after>{_YES}){_SEP})*$",
    re.IGNORECASE,
)
# "No, the second one", "不是第一个，是第二个": the choice after the no.
_CORRECTED = re.compile(
    rf"^{_SEP}(?:no|nope|not\s+that\s+one|不是|不对)(?:\s*(?:the\s+)?(?:{_FIRST}))?{_SEP}(?:是|i\s+mean|it'?s)?\s*"
    rf"(?:(?P<first>{_FIRST})|(?P<second>{_SECOND})){_SEP}(?:{_POLITE}{_SEP})*$",
    re.IGNORECASE,
)
_THUMBS_UP = ("👍", "👌", "🙆")
# Longer than any of these replies: a message this long is a question of its own.
_MAX_CHARS = 40


def _plain(text: str) -> str:
    """`fold_for_rules` (full-width, case, traditional Chinese), without emoji and other symbols
    (keycaps kept: 2️⃣)."""
    text = fold_for_rules(text)
    return "".join(
        ch for ch in text if not unicodedata.category(ch).startswith("S") or ch in "\u20e3"
    ).strip()


def accepted_offer(text: str, offered: int) -> int | None:
    """Which of the `offered` titles (0 = the first) `text` takes, or None when it is not an
    answer to the offer. A bare "yes" to two titles takes the first (the closer one). A question
    ("yes?", "嗯？") or a trailing-off "right..." is not an answer."""
    if offered <= 0:
        return None
    plain = _plain(text)
    if not plain and any(sign in text for sign in _THUMBS_UP):
        return 0
    if not plain or len(plain) > _MAX_CHARS or re.search(r"[?？]|\.\.|…", plain):
        return None
    match = _REPLY.match(plain) or _CORRECTED.match(plain)
    if match is None:
        return None
    if match.group("second"):
        choice = offered - 1 if match.group("second").strip().lower().startswith("last") else 1
    elif match.group("first"):
        choice = 0
    elif "yes" in match.groupdict() and (match.group("yes") or match.group("yes_after")):
        choice = 0
    else:
        return None
    return choice if choice < offered else None
