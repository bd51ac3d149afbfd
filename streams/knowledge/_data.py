"""The package's data: the demo FAQ and the question sets retrieval is trained and measured on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from streams.knowledge._document import Document


def _jsonl(name: str) -> list[dict[str, object]]:
    text = resources.files("streams.knowledge").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_demo_documents() -> list[Document]:
    """The bilingual online-shop FAQ that `make run` loads for the demo tenant."""
    return [Document.from_dict(row) for row in _jsonl("demo_faq.jsonl")]


@dataclass(frozen=True)
class Question:
    """A customer question and the document that answers it (None: nothing in the FAQ does)."""

    text: str
    language: str
    document_id: str | None
    intent: str | None = None


def load_questions(name: str) -> list[Question]:
    """`train_questions.jsonl` (tuning) or `heldout_questions.jsonl` (measurement only)."""
    return questions_from_rows(_jsonl(name))


def questions_from_rows(rows: list[dict[str, object]]) -> list[Question]:
    return [
        Question(
            text=str(row["question"]),
            language=str(row["language"]),
            document_id=None if row.get("document_id") is None else str(row["document_id"]),
            intent=None if row.get("intent") is None else str(row["intent"]),
        )
        for row in rows
    ]


def read_jsonl(path: Path) -> list[dict[str, object]]:
    """Rows of a JSON-lines file outside the package (the benchmarks' independent sets)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
