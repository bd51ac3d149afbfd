"""Text preparation shared by training and inference (pure functions, no model imports)."""

from __future__ import annotations

import re
import unicodedata

from streams.knowledge._text import to_simplified

# Spaces become a visible mark so char n-grams never contain a space: skl2onnx's TF-IDF converter
# splits vocabulary entries on spaces, which would break n-grams that span a word boundary.
SPACE_MARK = "_"
_SPACES = re.compile(r"\s+")
_DIGITS = re.compile(r"\d")


def normalize_text(text: str) -> str:
    """The string the char n-gram stage sees: NFKC, lower case, traditional Chinese as simplified
    (`to_simplified`), digits folded, spaces marked."""
    text = to_simplified(unicodedata.normalize("NFKC", text).lower().strip())
    # Order numbers and phone numbers carry no intent; one digit class keeps them from
    # becoming thousands of rare n-grams.
    text = _DIGITS.sub("0", text)
    return SPACE_MARK + _SPACES.sub(SPACE_MARK, text) + SPACE_MARK


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF  # unified ideographs
        or 0x3400 <= code <= 0x4DBF  # extension A
        or 0xF900 <= code <= 0xFAFF  # compatibility ideographs
        or 0x20000 <= code <= 0x2FA1F  # extensions B.. and supplement
    )


def detect_language(text: str) -> str:
    """'zh' when Chinese characters make up a fair share of the letters, else 'en'.

    Mixed messages ("tk 退款了吗") count as Chinese: one ideograph outweighs a Latin word, so the
    share is computed over ideographs versus Latin words, not characters.
    """
    cjk = sum(1 for ch in text if _is_cjk(ch))
    if cjk == 0:
        return "en"
    latin_words = len(re.findall(r"[A-Za-z]+", text))
    return "zh" if cjk >= latin_words else "en"
