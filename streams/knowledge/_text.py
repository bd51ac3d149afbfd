"""Tokens for keyword retrieval: CJK as character unigrams + bigrams, English as stemmed words."""

from __future__ import annotations

import re
import threading
import unicodedata

import opencc

# CJK ideographs (incl. extension A and compatibility) — runs of these have no spaces to split on.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_RUN = re.compile(rf"[{_CJK}]+|[a-z0-9]+(?:['’][a-z]+)?")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
_LATIN_CHAR = re.compile(r"[a-zA-Z]")

# Particles and pronouns that carry no topic; as unigrams they only add noise (bigrams keep them).
_ZH_STOP_UNIGRAMS = frozenset(
    "的了吗呢吧啊呀哦哈么嘛亲在我你他她它是有和就都也还要这那个么请问一下吧能可以怎"
)
_EN_STOP = frozenset(
    """a an the and or but if of to in on at for from by with about as into is are was were be been being
    am do does did doing have has had having i me my mine we us our you your he him his she her it its
    they them their this that these those there here what which who whom whose when where why how
    can could would should will shall may might must not no yes so than too very just also please pls
    hi hello hey thanks thank ok okay im i'm i've i'd it's dont don't does doesn't didn't cant can't
    any some all get got""".split()
)


def normalize(text: str) -> str:
    """NFKC (full-width to half-width), lowercase, traditional Chinese as simplified."""
    return to_simplified(unicodedata.normalize("NFKC", text).lower())


def stem(word: str) -> str:
    """A light English stemmer (plural, -ing, -ed, final e): refund/refunds/refunded match."""
    if word.isdigit() or len(word) <= 3:
        return word
    if word.endswith(("'s", "’s")):
        word = word[:-2]
    stripped = False
    if word.endswith("ies") and len(word) >= 5:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "ches", "shes", "xes", "zes")) and len(word) >= 5:
        word = word[:-2]
    elif word.endswith("ing") and len(word) >= 6:
        word, stripped = word[:-3], True
    elif word.endswith("ed") and len(word) >= 5:
        word, stripped = word[:-2], True
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) >= 4:
        word = word[:-1]
    # shipped -> shipp -> ship; cancelled -> cancel.
    if stripped and len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou":
        word = word[:-1]
    # receive/received/receiving all become "receiv".
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Keyword tokens of a text, in order (duplicates kept: BM25 counts term frequency)."""
    tokens: list[str] = []
    for run in _RUN.findall(normalize(text)):
        if _CJK_CHAR.match(run):
            for i, ch in enumerate(run):
                if ch not in _ZH_STOP_UNIGRAMS:
                    tokens.append(ch)
                if i + 1 < len(run):
                    tokens.append(run[i : i + 2])
        elif run not in _EN_STOP:
            tokens.append(stem(run))
    return tokens


def detect_language(text: str) -> str:
    """ "zh" when CJK characters make up a fair share of the letters, else "en"."""
    cjk = len(_CJK_CHAR.findall(text))
    latin_words = len(re.findall(r"[a-zA-Z]+", text))
    if cjk == 0:
        return "en"
    # A Chinese sentence with an English word or two (mixed messages) is still Chinese.
    return "zh" if cjk >= latin_words else "en"


_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# Traditional Chinese to simplified (OpenCC's t2s), one converter per thread.
_CONVERTERS = threading.local()


def to_simplified(text: str) -> str:
    """Traditional Chinese as simplified (OpenCC's t2s); text without Chinese characters as it is.

    What keyword search, the sentence encoder and the intent models see of a message and of an
    article: the models were trained on simplified Chinese, and a question typed in traditional
    characters (退貨 for 退货) shares few keywords with a simplified FAQ. Over the held-out sets'
    Chinese questions converted to traditional, the assistant answered 51-65% right against 65-88%
    for the same questions as written (benchmarks/RESULTS.md, twenty-fourth session). Answers quote
    the article as written."""
    if not _CJK_CHAR.search(text):
        return text
    converter = getattr(_CONVERTERS, "t2s", None)
    if converter is None:
        converter = _CONVERTERS.t2s = opencc.OpenCC("t2s")
    return str(converter.convert(text))


def fold_for_rules(text: str) -> str:
    """What keyword rules match against: NFKC (full-width to half-width), case-folded, traditional
    Chinese as simplified (投訴 / 騙子 / 服務極差 read as 投诉 / 骗子 / 服务极差), zero-width characters out."""
    return to_simplified(unicodedata.normalize("NFKC", text).casefold().translate(_ZERO_WIDTH))
