"""Documents and their chunks: the unit a customer's question is matched against."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from streams.knowledge._text import detect_language

MAX_CHUNK_CHARS = 360
"""Upper bound of a chunk's body (the title is carried separately). Short FAQ articles stay whole."""

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)、]))")
# A sentence ends after 。！？；!? or a period followed by a space; the delimiter stays with its sentence.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?])|(?<=\.)\s+")


@dataclass(frozen=True)
class Document:
    """A knowledge-base article of one tenant, as UpsertDocuments carries it."""

    document_id: str
    title: str
    body: str
    language: str = ""
    tags: tuple[str, ...] = ()
    url: str = ""

    def __post_init__(self) -> None:
        if not self.document_id or "#" in self.document_id:
            raise ValueError(f"document_id must be non-empty and free of '#': {self.document_id!r}")
        if not self.language:
            object.__setattr__(self, "language", detect_language(f"{self.title}\n{self.body}"))
        object.__setattr__(self, "tags", tuple(self.tags))

    @property
    def fingerprint(self) -> str:
        """Content hash: an upsert with the same fingerprint changes nothing (replays are cheap)."""
        payload = json.dumps(
            [self.title, self.body, self.language, list(self.tags), self.url], ensure_ascii=False
        )
        return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Document:
        tags = data.get("tags") or ()
        return cls(
            document_id=str(data["document_id"]),
            title=str(data.get("title", "")),
            body=str(data.get("body", "")),
            language=str(data.get("language", "") or ""),
            tags=tuple(str(t) for t in tags) if isinstance(tags, list | tuple) else (),
            url=str(data.get("url", "") or ""),
        )


@dataclass(frozen=True)
class Chunk:
    """A bounded piece of a document's body; `chunk_id` is `{document_id}#{n}`."""

    chunk_id: str
    document_id: str
    n: int
    title: str
    text: str
    language: str
    tags: tuple[str, ...] = field(default=())

    @property
    def indexed_text(self) -> str:
        """What keyword and embedding retrieval see: the title gives every chunk its context."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s and s.strip()]


def _hard_split(text: str, limit: int) -> list[str]:
    return [text[i : i + limit] for i in range(0, len(text), limit)]


def chunk_document(document: Document, max_chars: int = MAX_CHUNK_CHARS) -> list[Chunk]:
    """Split a body into chunks of at most `max_chars`: whole paragraphs are packed together,
    long paragraphs are split at sentence ends, and only a sentence longer than the bound is cut."""
    pieces: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(document.body):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if len(paragraph) <= max_chars:
            pieces.append(paragraph)
            continue
        for sentence in _sentences(paragraph):
            pieces.extend(_hard_split(sentence, max_chars) if len(sentence) > max_chars else [sentence])

    texts: list[str] = []
    current = ""
    for piece in pieces:
        joined = f"{current}\n{piece}" if current else piece
        if len(joined) <= max_chars:
            current = joined
        else:
            texts.append(current)
            current = piece
    if current:
        texts.append(current)
    if not texts:
        texts = [""]  # a title-only document is still findable by its title

    return [
        Chunk(
            chunk_id=f"{document.document_id}#{n}",
            document_id=document.document_id,
            n=n,
            title=document.title,
            text=text,
            language=document.language,
            tags=document.tags,
        )
        for n, text in enumerate(texts)
    ]
