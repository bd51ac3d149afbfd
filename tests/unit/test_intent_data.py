"""The training and held-out data meet the taxonomy and size requirements and never overlap."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from streams.assistant.intent import LABELS

DATA = Path(__file__).resolve().parents[2] / "streams" / "assistant" / "intent" / "data"

EXPECTED_LABELS = {
    "order_status", "shipping_delivery", "refund", "return_exchange", "cancel_order", "change_address",
    "payment_problem", "invoice", "account_login", "discount_coupon", "product_question", "complaint",
    "talk_to_human", "greeting", "thanks_goodbye", "out_of_scope",
}  # fmt: skip


def load(name: str) -> list[dict[str, str]]:
    return [
        json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def test_taxonomy_is_exactly_the_sixteen_labels() -> None:
    assert set(LABELS) == EXPECTED_LABELS and len(LABELS) == 16


def test_rows_are_well_formed() -> None:
    for name in ("train.jsonl", "heldout.jsonl"):
        for row in load(name):
            assert set(row) == {"text", "label", "lang"}, row
            assert row["label"] in EXPECTED_LABELS and row["lang"] in {"zh", "en"} and row["text"].strip()


def test_sizes_per_label_and_language() -> None:
    train = Counter((r["lang"], r["label"]) for r in load("train.jsonl"))
    heldout = Counter((r["lang"], r["label"]) for r in load("heldout.jsonl"))
    for lang in ("zh", "en"):
        for label in EXPECTED_LABELS:
            assert train[(lang, label)] >= 60, (lang, label)
            assert heldout[(lang, label)] >= 20, (lang, label)


def test_heldout_never_appears_in_train() -> None:
    train = {r["text"].strip().lower() for r in load("train.jsonl")}
    leaked = [r["text"] for r in load("heldout.jsonl") if r["text"].strip().lower() in train]
    assert leaked == []
