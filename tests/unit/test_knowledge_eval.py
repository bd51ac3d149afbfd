"""The retrieval evaluation's scenarios (twin removed, answer removed) and its answer/reject rates."""

from __future__ import annotations

import numpy as np

from streams.knowledge import Document, Hit, KnowledgeIndex, Scores
from streams.knowledge._data import Question
from streams.knowledge._eval import CachingEncoder, Metrics, cases, run_cases, twin_of

DOCS = [
    Document("zh-refund", "退款多久到账", "原路退回，1-3个工作日。"),
    Document("en-refund", "When will I get my refund", "Refunds take 3-5 business days."),
    Document("en-gift-cards", "Gift cards", "Gift cards never expire."),
]


def test_twin_is_the_same_id_in_the_other_language():
    ids = [d.document_id for d in DOCS]
    assert twin_of("zh-refund", ids) == "en-refund"
    assert twin_of("en-refund", ids) == "zh-refund"
    assert twin_of("en-gift-cards", ids) is None
    assert twin_of("refund", ids) is None


def test_cases_derive_cross_language_and_out_of_scope_from_twins():
    questions = [
        Question("how long for my refund", "en", "en-refund"),
        Question("do gift cards expire", "en", "en-gift-cards"),  # no twin: only as asked
        Question("礼品卡过期吗", "zh", "en-gift-cards"),  # already cross-language
        Question("what's the weather", "en", None),
    ]
    got = cases(DOCS, questions, ("asked", "twin removed", "answer removed"))
    summary = [(c.question.text, c.scenario, c.expected, sorted(c.excluded), c.cross_language) for c in got]
    assert summary == [
        ("how long for my refund", "asked", "en-refund", [], False),
        ("how long for my refund", "twin removed", "zh-refund", ["en-refund"], True),
        ("how long for my refund", "answer removed", None, ["en-refund", "zh-refund"], False),
        ("do gift cards expire", "asked", "en-gift-cards", [], False),
        ("礼品卡过期吗", "asked", "en-gift-cards", [], True),
        ("what's the weather", "asked", None, [], False),
    ]
    assert [c.scenario for c in cases(DOCS, questions, ("asked",))] == ["asked"] * 4


def test_run_cases_leaves_the_excluded_documents_out():
    questions = [Question("how long for my refund", "en", "en-refund")]
    got = cases(DOCS, questions, ("asked", "twin removed", "answer removed"))
    seen = run_cases(
        DOCS, got, KnowledgeIndex, lambda index, case: sorted(d.document_id for d in index.documents())
    )
    assert seen == [
        ["en-gift-cards", "en-refund", "zh-refund"],
        ["en-gift-cards", "zh-refund"],
        ["en-gift-cards"],
    ]


def _hit(document_id: str, relevant: bool) -> Hit:
    return Hit(document_id, f"{document_id}#0", "", "", "en", "", (), Scores(0, 0, 0, 0.5, 0.5), relevant)


def test_metrics_split_answers_into_right_wrong_rejected_and_false_positives():
    asked = cases(
        DOCS, [Question("refund?", "en", "en-refund"), Question("weather?", "en", None)], ("asked",)
    )
    m = Metrics()
    m.add(asked[0], [_hit("en-refund", True)])  # right
    m.add(asked[0], [_hit("zh-refund", True), _hit("en-refund", True)])  # wrong answer, rank 1
    m.add(asked[0], [_hit("en-refund", False)])  # right document, rejected: a false negative
    m.add(asked[1], [_hit("en-gift-cards", True)])  # out of scope answered: a false positive
    m.add(asked[1], [_hit("en-gift-cards", False)])
    assert m.answerable == 3 and m.out_of_scope == 2
    assert m.top1() == 2 / 3 and m.mrr() == (1 + 0.5 + 1) / 3 and m.recall(k=1) == 2 / 3
    assert m.rates() == {
        "right": 1 / 3,
        "wrong_answer": 1 / 3,
        "false_negative": 1 / 3,
        "false_positive": 0.5,
    }


def test_caching_encoder_encodes_each_text_once():
    class Counting:
        def __init__(self) -> None:
            self.texts: list[str] = []

        def encode(self, texts: list[str]) -> np.ndarray:
            self.texts += texts
            return np.asarray([[len(t), 1.0] for t in texts], dtype=np.float32)

    inner = Counting()
    cached = CachingEncoder(inner)
    first = cached.encode(["a", "bb", "a"])
    second = cached.encode(["bb", "ccc"])
    assert inner.texts == ["a", "bb", "ccc"]
    assert first[:, 0].tolist() == [1, 2, 1] and second[:, 0].tolist() == [2, 3]
