"""Bilingual text helpers: terms for overlap (CJK bigrams, English words), sentences, token chunks."""

from __future__ import annotations

import math
import re

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
# A sentence ends at CJK/ASCII terminators or a line break; ASCII '.' only before whitespace so that
# "3.5" and "example.com" stay whole.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;])|(?<=\.)(?=\s)|\n+")
# Streaming chunks: a CJK character pair, or a word with its trailing whitespace, or punctuation.
_CHUNK = re.compile(f"[{_CJK}]{{1,2}}|[^\\s{_CJK}]+\\s*|\\s+")

_EN_STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be been being do does
    did have has had i me my we our you your it its this that these those what which who whom how
    when where why can could would should will shall may might must not no yes please pls hi hello
    there their they them he she his her so than then too very just about any some up out""".split()
)
# Frequent function characters make bigrams that match everywhere; a bigram made only of them is dropped.
_ZH_STOPCHARS = frozenset("的了吗呢吧啊呀么是我你他她它们在有和就也都还这那个怎什请问")


def cjk_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if _CJK_CHAR.match(c)) / len(letters)


def guess_language(text: str) -> str:
    """ "zh" when a noticeable share of the letters are CJK, else "en"."""
    return "zh" if cjk_ratio(text) >= 0.2 else "en"


def terms(text: str) -> set[str]:
    """Overlap terms: CJK character bigrams (single characters for one-character runs) and
    lower-case English words and numbers, without stop words."""
    out: set[str] = set()
    lowered = text.lower()
    for run in _CJK_RUN.findall(lowered):
        if len(run) == 1:
            if run not in _ZH_STOPCHARS:
                out.add(run)
            continue
        for i in range(len(run) - 1):
            pair = run[i : i + 2]
            if not (pair[0] in _ZH_STOPCHARS and pair[1] in _ZH_STOPCHARS):
                out.add(pair)
    for word in _WORD.findall(_CJK_RUN.sub(" ", lowered)):
        if word not in _EN_STOPWORDS:
            out.add(_stem(word))
    return out


def _stem(word: str) -> str:
    """A light suffix strip so that refund/refunds/refunded and arrive/arrived meet."""
    word = word.replace("’", "'").split("'")[0]
    for suffix in ("ing", "ed", "es", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: -len(suffix)]
    return word


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def stream_chunks(text: str) -> list[str]:
    """Split text into token-sized pieces whose concatenation is exactly `text`."""
    return _CHUNK.findall(text)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: one token per CJK character, about four other characters per token."""
    cjk = len(_CJK_CHAR.findall(text))
    other = len(text) - cjk
    return cjk + math.ceil(other / 4)
