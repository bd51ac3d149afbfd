"""The grounded template answerer: the embedded default, and the end of every fallback chain.

It never writes anything the knowledge base does not say. From the passages it picks one — the best
in the customer's language, or the best in the other language with a short note saying so — then the
sentences of it that overlap the question most (CJK bigrams, English words; a term few of its
sentences share weighs more), kept in their original order, and cites that passage. With no
passage it asks whether the customer meant one of the articles that came close (if any), else says
it found nothing; either way it offers a person.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from ._text import estimate_tokens, guess_language, sentences, stream_chunks, terms
from ._types import AnswerRequest, Citation, Draft, GroundingPassage

TEMPLATE_MODEL = "grounded-template-v1"

NO_ANSWER = {
    "en": (
        "Sorry, I couldn't find an answer to that in our help centre. "
        "Would you like me to connect you with a human agent?"
    ),
    "zh": "抱歉，我在帮助中心没有找到这个问题的答案。需要为您转接人工客服吗？",
}
# No passage, but articles came close (AnswerRequest.suggestions): ask, as a person would, rather
# than say nothing was found (a "two-stage fallback"). The customer may ask again in the words of
# a title, or take the person offered.
DID_YOU_MEAN = {
    "en": (
        "Sorry, I'm not sure I found the answer to that. Did you mean {titles}? Ask me about it, "
        "or I can connect you with a human agent."
    ),
    "zh": "抱歉，我不确定找到了这个问题的答案。您是想问{titles}吗？可以直接问我，或者我为您转接人工客服。",
}
_TITLES = {"en": ("“{}”", " or "), "zh": ("「{}」", "还是")}
SMALL_TALK = {
    "greeting": {"en": "Hello! How can I help you today?", "zh": "您好！请问有什么可以帮您？"},
    "thanks_goodbye": {
        "en": "You're welcome! Is there anything else I can help with?",
        "zh": "不客气！还有其他可以帮您的吗？",
    },
}
_OTHER_LANGUAGE_NOTE = {
    # Customer language -> note placed before a passage written in the other language.
    "en": "(From our Chinese help centre) ",
    "zh": "（以下内容来自英文帮助文档）",
}
_SOURCE = {"en": "\n(Source: {title})", "zh": "\n（来源：{title}）"}

# A passage in the customer's language wins over a better-scored one in the other language unless
# its score falls below this share of the best score.
_SAME_LANGUAGE_SHARE = 0.75


class TemplateAnswerer:
    """Deterministic, bilingual, sub-millisecond; streams its text in token-sized chunks."""

    # No I/O: the gateway checks its deadlines between deltas instead of arming a timer per delta.
    in_process = True

    def __init__(self, *, name: str = "template", max_sentences: int = 3, max_chars: int = 400) -> None:
        self._name = name
        self._max_sentences = max_sentences
        self._max_chars = max_chars

    @property
    def name(self) -> str:
        return self._name

    async def aclose(self) -> None:
        return None

    def compose(self, request: AnswerRequest, draft: Draft) -> str:
        """The whole reply text; fills `draft`. `generate` streams exactly this."""
        language = request.language if request.language in NO_ANSWER else guess_language(request.question)
        draft.model = TEMPLATE_MODEL
        passage = choose_passage(request.passages, language)
        if passage is None:
            small_talk = SMALL_TALK.get(request.intent)
            if small_talk:
                text = small_talk[language]
            elif request.suggestions:
                quote, joiner = _TITLES[language]
                titles = joiner.join(quote.format(t) for t in request.suggestions)
                text = DID_YOU_MEAN[language].format(titles=titles)
            else:
                text = NO_ANSWER[language]
            draft.grounded = False
            draft.citations = []
        else:
            extract = self._extract(request.question, passage.text)
            passage_language = (
                passage.language if passage.language in NO_ANSWER else guess_language(passage.text)
            )
            note = _OTHER_LANGUAGE_NOTE[language] if passage_language != language else ""
            source = _SOURCE[language].format(title=passage.title) if passage.title else ""
            text = f"{note}{extract}{source}"
            draft.grounded = True
            draft.citations = [Citation(passage.document_id, passage.chunk_id, passage.score)]
        draft.prompt_tokens = estimate_tokens(request.question) + sum(
            estimate_tokens(p.text) for p in request.passages
        )
        draft.completion_tokens = len(stream_chunks(text))
        return text

    async def generate(self, request: AnswerRequest, draft: Draft) -> AsyncIterator[str]:
        for chunk in stream_chunks(self.compose(request, draft)):
            yield chunk

    def _extract(self, question: str, passage_text: str) -> str:
        candidates = sentences(passage_text)
        if not candidates:
            return passage_text.strip()[: self._max_chars]
        question_terms = terms(question)
        sentence_terms = [terms(s) for s in candidates]
        # A question term found in few sentences of the passage says more about which one answers
        # than one the whole article repeats: "do your gift cards expire?" against a gift-card
        # article is answered by the one sentence with "expire", not by the three with "gift cards".
        spread = {t: sum(t in st for st in sentence_terms) for t in question_terms}
        scored = [
            (sum(1 / spread[t] for t in question_terms & st), -i, i) for i, st in enumerate(sentence_terms)
        ]
        best = sorted(scored, reverse=True)
        if best[0][0] == 0:
            # Nothing overlaps (typically a cross-language passage): the passage's lead answers best.
            chosen = list(range(len(candidates)))
        else:
            chosen = [i for overlap, _, i in best if overlap > 0]
        picked: list[int] = []
        length = 0
        for i in chosen[: self._max_sentences]:
            if picked and length + len(candidates[i]) > self._max_chars:
                break
            picked.append(i)
            length += len(candidates[i])
        parts = [candidates[i] for i in sorted(picked)]
        joiner = "" if guess_language(passage_text) == "zh" else " "
        text = joiner.join(parts)
        if len(text) > self._max_chars:
            text = text[: self._max_chars].rstrip() + "…"
        return text


def choose_passage(passages: Sequence[GroundingPassage], language: str) -> GroundingPassage | None:
    """The best passage by score, preferring the customer's language when it scores close to the best."""
    if not passages:
        return None
    best = max(passages, key=lambda p: p.score)
    same = [p for p in passages if _language_of(p) == language]
    if not same:
        return best
    best_same = max(same, key=lambda p: p.score)
    if best.score <= 0 or best_same.score >= best.score * _SAME_LANGUAGE_SHARE:
        return best_same
    return best


def _language_of(passage: GroundingPassage) -> str:
    return passage.language if passage.language in NO_ANSWER else guess_language(passage.text)
