"""PII in free text masked before it reaches analytics or a report. Pure: no I/O, no clock.

Kinds (each can be turned on or off per tenant, see `RedactionPolicy`):

- ``email``: ``zhang.san@example.com`` -> ``z***@example.com``;
- ``phone``: CN mobiles (``13812345678``, ``+86 138-1234-5678``) -> ``138****5678``, and
  international numbers written with a ``+`` country code or in the North American
  ``(415) 555-2671`` shape -> every digit but the country code and the last four masked;
- ``card``: 13-19 digit bank card numbers (plain or in groups of four) that pass the Luhn check
  -> all but the last four digits masked;
- ``cn_id``: 18-character resident identity numbers with a valid birth date and ISO 7064
  checksum -> all but the first three and the last four characters masked.

What is *not* masked matters as much: order, tracking and invoice numbers are long digit strings
too. A digit string counts only when it stands alone (no letter or digit glued to either side, so
``SF1234567890123`` or ``SB20261130`` never match), passes its checksum, and is not introduced by
a word such as 订单号 / 运单 / order / tracking in the same clause. Dates and times have no
pattern here at all.

Numbers are recognised whatever digits they are written in: full-width ``１３８１２３４５６７８``
(Chinese input methods type them so), with full-width signs and letters around them, or another
script's decimal digits. A masked span is written in ASCII (``138****5678``); the rest of the text
stays as typed.

The result is deterministic (the same text always gives the same masked text), which the
projector relies on: a batch projected twice gives the same rows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

EMAIL = "email"
PHONE = "phone"
CARD = "card"
CN_ID = "cn_id"
KINDS: tuple[str, ...] = (EMAIL, CN_ID, CARD, PHONE)  # also the priority when matches overlap

# The full-width forms a number or an e-mail address is written with (digits, letters, + ( ) - .
# @ #, the ideographic space), as their ASCII forms: one character for one, so a span of the
# mapped text is the same span of the original. Full-width punctuation (，？) stays: the clause
# breaks below know it.
_WIDE_CHARS = "０１２３４５６７８９ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺａｂｃｄｅｆｇｈｉｊｋｌｍｎｏｐｑｒｓｔｕｖｗｘｙｚ＋（）－．＠＃\u3000"
_WIDE_TO_ASCII = str.maketrans(
    _WIDE_CHARS, "".join(chr(ord(c) - 0xFEE0) if c != "\u3000" else " " for c in _WIDE_CHARS)
)
_WIDE = re.compile(f"[{re.escape(_WIDE_CHARS)}]")
_OTHER_DIGIT = re.compile(r"(?![0-9])\d")  # a decimal digit of another script than ASCII's


def _as_ascii(text: str) -> str:
    """`text` with full-width forms and other scripts' decimal digits as ASCII (see _WIDE_TO_ASCII)."""
    text = text.translate(_WIDE_TO_ASCII)
    if _OTHER_DIGIT.search(text):
        text = "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in text)
    return text


_EDGE_L = r"(?<![0-9A-Za-z])"
_EDGE_R = r"(?![0-9A-Za-z])"
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_CN_ID = re.compile(
    _EDGE_L + r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]" + _EDGE_R
)
_CARD = re.compile(_EDGE_L + r"(?:\d{4}(?:[ \-]\d{4}){2,3}(?:[ \-]\d{1,4})?|\d{13,19})" + _EDGE_R)
_CN_MOBILE = re.compile(r"(?<![0-9A-Za-z+])(?:(?:\+|00)?86[ \-]?)?1[3-9]\d(?:[ \-]?\d{4}){2}" + _EDGE_R)
_INTL_PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?:\+\d{1,3}(?:[ \-.]?\(?\d{1,4}\)?){2,5}|\(\d{3}\)[ \-.]?\d{3}[ \-.]\d{4}|\d{3}[\-.]\d{3}[\-.]\d{4})"
    + _EDGE_R
)

# Words that introduce a number that is not personal data (same clause, just before it).
_NOT_PII_CONTEXT = re.compile(
    r"(订单|单号|运单|快递|物流|包裹|发票|编号|流水|工单|批次|型号|序列号|货号|"
    r"order|tracking|waybill|parcel|shipment|invoice|ticket|ref(?:erence)?|sku|serial|no\.|#)",
    re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(r"[0-9，,。；;！!？?\n]")
_CONTEXT_CHARS = 16


@dataclass(frozen=True, slots=True)
class Match:
    kind: str
    start: int
    end: int


_DOUBLED = {str(d): (2 * d if d < 5 else 2 * d - 9) for d in range(10)}


def luhn_valid(digits: str) -> bool:
    # From the right: every second digit doubled (digits of the product summed).
    total = sum(map(int, digits[-1::-2])) + sum(_DOUBLED[c] for c in digits[-2::-2])
    return total % 10 == 0


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def cn_id_valid(value: str) -> bool:
    """ISO 7064 MOD 11-2 checksum of an 18-character resident identity number, and a real date."""
    if len(value) != 18 or not value[:17].isdigit():
        return False
    if (
        _ID_CHECK[sum(int(c) * w for c, w in zip(value[:17], _ID_WEIGHTS, strict=True)) % 11]
        != value[17].upper()
    ):
        return False
    year, month, day = int(value[6:10]), int(value[10:12]), int(value[12:14])
    days = (
        31,
        29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28,
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    )
    return 1 <= month <= 12 and 1 <= day <= days[month - 1]


def _introduced_as_reference(text: str, start: int) -> bool:
    window = text[max(0, start - _CONTEXT_CHARS) : start]
    breaks = list(_CLAUSE_BREAK.finditer(window))
    if breaks:
        window = window[breaks[-1].end() :]
    return _NOT_PII_CONTEXT.search(window) is not None


_NON_DIGIT = re.compile(r"\D")


def _digits(s: str) -> str:
    return _NON_DIGIT.sub("", s)


# One pass finds where anything numeric could be (a run of 8+ digits and separators, not glued
# to letters); the precise patterns then run only inside those spans. Most messages have none.
# A run: an optional lead, a digit, 6+ digits or separators, a digit or an ID's final X.
_LEAD, _SEPARATORS, _LAST = "+(", " -().", "Xx"
_NUMBERISH = re.compile(
    rf"(?<![0-9A-Za-z])[{re.escape(_LEAD)}]?\d[\d{re.escape(_SEPARATORS)}]{{6,}}[\d{_LAST}]"
)
_ASCII_TO_WIDE = {ascii_: wide for wide, ascii_ in _WIDE_TO_ASCII.items()}


def _or_wide(chars: str) -> str:
    """A character class's members: `chars` and their full-width forms, escaped."""
    return re.escape(chars + chars.translate(_ASCII_TO_WIDE))


# The same run before full-width forms are mapped (and not told apart from letters before it):
# every text without a match has no number to mask.
_MAYBE_NUMBERISH = re.compile(
    rf"[{_or_wide(_LEAD)}]?\d[\d{_or_wide(_SEPARATORS)}]{{6,}}[\d{_or_wide(_LAST)}]"
)


def find_pii(text: str, kinds: Iterable[str] = KINDS) -> list[Match]:
    """Every PII span of the given kinds, non-overlapping, in text order."""
    return _find(text, kinds)[1]


def _find(text: str, kinds: Iterable[str]) -> tuple[str, list[Match]]:
    """(`text` as ASCII where it matters, see _as_ascii; its PII spans): find_pii."""
    wanted: AbstractSet[str] = kinds if isinstance(kinds, (set, frozenset)) else set(kinds)
    if not wanted:
        return text, []
    email = EMAIL in wanted and ("@" in text or "\uff20" in text)
    numeric = wanted - {EMAIL}
    candidates = _MAYBE_NUMBERISH.findall(text) if numeric else []
    if not email and not candidates:
        return text, []
    # Mapped only when it matters: a number not in ASCII, or full-width forms (letters glued to a
    # number, an ＠, a ＃ before it) anywhere.
    if not text.isascii() and (any(not c.isascii() for c in candidates) or _WIDE.search(text)):
        text = _as_ascii(text)
    found: list[Match] = []
    if email:
        found += [Match(EMAIL, m.start(), m.end()) for m in _EMAIL.finditer(text)]
    if candidates:
        for span in _NUMBERISH.finditer(text):
            found += _numeric_pii(text, span.start(), span.end(), numeric)
    # Overlaps: the higher-priority kind wins (an ID is not also a card), then the longer span.
    if len(found) < 2:
        return text, found
    priority = {k: i for i, k in enumerate(KINDS)}
    found.sort(key=lambda m: (priority[m.kind], -(m.end - m.start), m.start))
    kept: list[Match] = []
    for candidate in found:
        if all(candidate.end <= k.start or candidate.start >= k.end for k in kept):
            kept.append(candidate)
    return text, sorted(kept, key=lambda k: k.start)


def _numeric_pii(text: str, start: int, end: int, wanted: AbstractSet[str]) -> list[Match]:
    """IDs, cards and phones within text[start:end] (the patterns still see the text around it
    for their boundaries)."""
    found: list[Match] = []
    # A kind is only looked for when the span has enough digits for it.
    digit_count = sum(c.isdigit() for c in text[start:end])
    if CN_ID in wanted and digit_count >= 17:
        found += [
            Match(CN_ID, m.start(), m.end())
            for m in _CN_ID.finditer(text, start, end)
            if cn_id_valid(m.group()) and not _introduced_as_reference(text, m.start())
        ]
    if CARD in wanted and digit_count >= 13:
        for m in _CARD.finditer(text, start, end):
            digits = _digits(m.group())
            if (
                13 <= len(digits) <= 19
                and luhn_valid(digits)
                and not _introduced_as_reference(text, m.start())
            ):
                found.append(Match(CARD, m.start(), m.end()))
    if PHONE in wanted:
        for pattern in (_CN_MOBILE, _INTL_PHONE):
            for m in pattern.finditer(text, start, end):
                digits = _digits(m.group())
                if 8 <= len(digits) <= 15 and not _introduced_as_reference(text, m.start()):
                    found.append(Match(PHONE, m.start(), m.end()))
    return found


def _mask_digits(s: str, keep_head: int, keep_tail: int) -> str:
    """Mask every digit (and ID letter X) of `s` except the first `keep_head` and last
    `keep_tail`; separators stay, so the shape stays readable."""
    positions = [i for i, c in enumerate(s) if c.isdigit() or c in "Xx"]
    hidden = set(positions[keep_head : len(positions) - keep_tail])
    return "".join("*" if i in hidden else c for i, c in enumerate(s))


def _mask_email(s: str) -> str:
    local, domain = s.split("@", 1)
    return f"{local[0]}***@{domain}"


def _mask_phone(s: str) -> str:
    digits = _digits(s)
    if s.startswith(("+86", "0086", "86")) and len(digits) > 11:
        # The country code and the mobile's first three stay: +86 138****5678.
        return _mask_digits(s, len(digits) - 11 + 3, 4)
    if len(digits) == 11 and digits[0] == "1" and not s.startswith(("+", "(")):
        return _mask_digits(s, 3, 4)
    head = len(re.match(r"\+(\d{1,3})", s).group(1)) if s.startswith("+") else 0  # type: ignore[union-attr]
    return _mask_digits(s, head, 4)


_MASKS: dict[str, Callable[[str], str]] = {
    EMAIL: _mask_email,
    PHONE: _mask_phone,
    CARD: lambda s: _mask_digits(s, 0, 4),
    CN_ID: lambda s: _mask_digits(s, 3, 4),
}


def redact(text: str, kinds: Iterable[str] = KINDS) -> str:
    """`text` with every PII span of `kinds` masked (the text itself when there is none)."""
    ascii_text, matches = _find(text, kinds)
    if not matches:
        return text
    out: list[str] = []
    last = 0
    for m in matches:
        out.append(text[last : m.start])
        out.append(_MASKS[m.kind](ascii_text[m.start : m.end]))
        last = m.end
    out.append(text[last:])
    return "".join(out)


# --- per-tenant policy --------------------------------------------------------------------------


def parse_kinds(spec: str) -> frozenset[str]:
    """``all``, ``none``/empty, or a comma-separated list of kinds."""
    value = spec.strip().lower()
    if value == "all":
        return frozenset(KINDS)
    if value in ("", "none", "off"):
        return frozenset()
    kinds = frozenset(k.strip() for k in value.split(",") if k.strip())
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(
            f"unknown PII kinds {sorted(unknown)}; expected some of {', '.join(KINDS)}, all or none"
        )
    return kinds


@dataclass(frozen=True)
class RedactionPolicy:
    """Which kinds are masked: `default` for every tenant, `tenants` overrides per tenant."""

    default: frozenset[str] = frozenset(KINDS)
    tenants: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, default: str, tenants: str = "") -> RedactionPolicy:
        """From settings: ``pii_redact`` ("all", "none", "email,phone") and ``pii_redact_tenants``
        ("acme=email,phone;lab=none")."""
        overrides: dict[str, frozenset[str]] = {}
        for part in tenants.split(";"):
            if not part.strip():
                continue
            tenant, sep, kinds = part.partition("=")
            if not sep or not tenant.strip():
                raise ValueError(f"expected tenant=kinds in pii_redact_tenants, got {part!r}")
            overrides[tenant.strip()] = parse_kinds(kinds)
        return cls(parse_kinds(default), overrides)

    def kinds_for(self, tenant: str) -> frozenset[str]:
        return self.tenants.get(tenant, self.default)

    def redact(self, tenant: str, text: str) -> str:
        return redact(text, self.kinds_for(tenant)) if text else text
