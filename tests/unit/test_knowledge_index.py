"""KnowledgeIndex without the sentence encoder: BM25, fusion, idempotent writes, tenants."""

from __future__ import annotations

import numpy as np

from streams.knowledge import Document, KnowledgeBase, KnowledgeIndex, load_demo_documents, rrf
from streams.knowledge._bm25 import BM25Index

REFUND_ZH = Document(
    "zh-refund", "退款多久到账", "退款原路返回：支付宝1-3个工作日到账，银行卡3-7个工作日。", tags=("refund",)
)
INVOICE_ZH = Document(
    "zh-invoice", "如何开发票", "下单时勾选开具发票并填写抬头和纳税人识别号。", tags=("invoice",)
)
SHIPPING_EN = Document(
    "en-shipping", "Shipping times", "Standard shipping takes 3-5 business days.", tags=("shipping_delivery",)
)


def test_bm25_finds_chinese_by_bigrams():
    bm25 = BM25Index()
    bm25.add("a#0", REFUND_ZH.title + REFUND_ZH.body)
    bm25.add("b#0", INVOICE_ZH.title + INVOICE_ZH.body)
    scores = bm25.scores("发票抬头开错了")
    assert max(scores, key=scores.__getitem__) == "b#0"
    scores = bm25.scores("亲，退款什么时候到账")
    assert max(scores, key=scores.__getitem__) == "a#0"


def test_bm25_remove_restores_previous_statistics():
    bm25 = BM25Index()
    bm25.add("a", "refund policy")
    before = bm25.scores("refund")
    bm25.add("b", "refund refund shipping")
    bm25.remove("b")
    assert bm25.scores("refund") == before
    assert len(bm25) == 1
    bm25.remove("missing")  # no error


def test_rrf_sums_reciprocal_ranks():
    fused = rrf([["a", "b", "c"], ["b", "a"]], k=60)
    assert fused["a"] == fused["b"] == 1 / 61 + 1 / 62
    assert fused["c"] == 1 / 63
    assert rrf([[], ["x"]]) == {"x": 1 / 61}


def test_keyword_search_returns_hits_with_scores_and_snippets():
    index = KnowledgeIndex()
    index.upsert_many([REFUND_ZH, INVOICE_ZH, SHIPPING_EN])
    hits = index.search("发票怎么开", limit=2)
    assert hits[0].document_id == "zh-invoice"
    assert hits[0].chunk_id == "zh-invoice#0"
    assert hits[0].snippet.startswith("下单时勾选")
    assert hits[0].language == "zh"
    assert hits[0].scores.bm25 > 0
    assert hits[0].scores.cosine == 0.0  # no encoder
    assert 0 < hits[0].scores.rerank <= 1
    assert len(hits) <= 2
    assert [h.document_id for h in index.search("shipping days")][:1] == ["en-shipping"]
    assert index.search("发票", limit=0) == []


def test_one_hit_per_document_best_chunk_first():
    long_body = "\n\n".join(
        ["Returns are accepted within 30 days. " * 6, "Refunds go to your card in 5 days. " * 6]
    )
    index = KnowledgeIndex(max_chunk_chars=250)
    index.upsert(Document("returns", "Returns", long_body))
    assert len(index.chunks("returns")) > 1
    hits = index.search("refund to card", 5)
    assert [h.document_id for h in hits] == ["returns"]
    assert "Refunds go to your card" in hits[0].snippet


def test_upsert_twice_is_idempotent_and_replace_changes_content():
    index = KnowledgeIndex()
    assert index.upsert(REFUND_ZH) is True
    first = index.search("退款到账")
    assert index.upsert(REFUND_ZH) is False  # replayed event
    assert index.search("退款到账") == first
    assert index.chunk_count == 1

    changed = Document(REFUND_ZH.document_id, "退款说明", "退款原路退回。")
    assert index.upsert(changed) is True
    assert len(index) == 1 and index.chunk_count == 1
    assert index.get(REFUND_ZH.document_id) == changed
    assert "退回" in index.search("退款")[0].snippet


def test_rebuild_from_events_gives_the_same_index_whatever_the_replays():
    events: list[tuple[str, Document | str]] = [
        ("upsert", REFUND_ZH),
        ("upsert", INVOICE_ZH),
        ("delete", "zh-invoice"),
        ("upsert", SHIPPING_EN),
        ("upsert", INVOICE_ZH),
    ]

    def replay(evs: list[tuple[str, Document | str]]) -> KnowledgeIndex:
        index = KnowledgeIndex()
        for kind, payload in evs:
            if kind == "upsert":
                assert isinstance(payload, Document)
                index.upsert(payload)
            else:
                assert isinstance(payload, str)
                index.delete(payload)
        return index

    once = replay(events)
    twice = replay(events + events)  # at-least-once redelivery of the whole stream
    assert once.documents() == twice.documents()
    for query in ("发票抬头", "退款", "shipping"):
        assert once.search(query) == twice.search(query)


def test_delete_is_idempotent_and_removes_from_search():
    index = KnowledgeIndex()
    index.upsert_many([REFUND_ZH, INVOICE_ZH])
    assert index.delete("zh-invoice") is True
    assert index.delete("zh-invoice") is False
    assert all(h.document_id != "zh-invoice" for h in index.search("发票"))
    assert "zh-invoice" not in index
    assert index.delete("never-there") is False


def test_upsert_many_keeps_the_last_version_of_an_id():
    index = KnowledgeIndex()
    newer = Document("zh-refund", "退款", "新的退款说明")
    assert index.upsert_many([REFUND_ZH, newer]) == 1
    assert index.get("zh-refund") == newer


def test_tenants_never_see_each_other():
    kb = KnowledgeBase()
    kb.upsert("acme", [REFUND_ZH])
    kb.upsert("globex", [INVOICE_ZH])
    assert [h.document_id for h in kb.search("acme", "发票 退款")] == ["zh-refund"]
    assert [h.document_id for h in kb.search("globex", "发票 退款")] == ["zh-invoice"]
    assert kb.search("initech", "退款") == []
    assert kb.get("acme", "zh-invoice") is None
    assert kb.delete("acme", "zh-invoice") is False
    assert kb.get("globex", "zh-invoice") == INVOICE_ZH
    assert kb.tenants() == ["acme", "globex"]


class _FakeEncoder:
    """Bag of characters hashed into 64 dims: enough to exercise the embedding path."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, text in enumerate(texts):
            for ch in text.lower():
                out[i, hash(ch) % 64] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


def test_embedding_path_batches_and_skips_unchanged_documents():
    encoder = _FakeEncoder()
    index = KnowledgeIndex(encoder)
    index.upsert_many([REFUND_ZH, INVOICE_ZH, SHIPPING_EN])
    assert encoder.calls == 1  # one batch for all chunks and titles
    index.upsert(REFUND_ZH)
    assert encoder.calls == 1  # unchanged: nothing re-encoded
    hits = index.search("发票抬头", 3)
    assert encoder.calls == 2  # the query
    assert hits[0].document_id == "zh-invoice"
    assert hits[0].scores.cosine > 0
    vector = encoder.encode(["发票抬头"])[0]
    assert index.search("发票抬头", 3, query_embedding=vector) == hits
    assert encoder.calls == 3  # only the explicit call above


def test_intent_matching_a_tag_favours_that_document():
    index = KnowledgeIndex()
    index.upsert_many(load_demo_documents())
    question = "how long does it take"
    without = index.search(question, 10)
    with_intent = index.search(question, 10, intent="refund")
    rank = lambda hits: [h.document_id for h in hits].index("en-refund-timeline")  # noqa: E731
    assert rank(with_intent) <= rank(without)
    assert with_intent[0].document_id == "en-refund-timeline"


def test_demo_faq_is_bilingual_and_well_formed():
    documents = load_demo_documents()
    languages = [d.language for d in documents]
    assert languages.count("zh") >= 25 and languages.count("en") >= 25
    assert len({d.document_id for d in documents}) == len(documents)
    assert all(d.title and d.body and d.tags and d.url for d in documents)


def test_the_other_languages_best_documents_are_always_candidates():
    """BM25 never matches across languages and the raw cosine favours the question's language: the
    only Chinese article must still reach the reranker when 60 English ones outscore it."""
    english = [
        Document(f"en-{i}", f"Shipping question {i}", f"Parcels and delivery times, case {i}.")
        for i in range(60)
    ]
    index = KnowledgeIndex(_FakeEncoder())
    index.upsert_many([*english, INVOICE_ZH])
    candidates = {c.document_id for c in index._candidates("shipping delivery", None, None)}
    assert "zh-invoice" in candidates
    assert len(candidates) < 61  # not simply everything


def test_centering_takes_the_language_mean_out_and_renormalises():
    from streams.knowledge._index import _centre

    mean = np.asarray([0.2, 0.0, 0.0], dtype=np.float32)
    vector = np.asarray([0.8, 0.6, 0.0], dtype=np.float32)
    centered = _centre(vector, mean)
    assert np.allclose(centered, [np.sqrt(0.5), np.sqrt(0.5), 0.0], atol=1e-5)
    assert _centre(vector, None) is vector
    assert _centre(vector, np.zeros(5, dtype=np.float32)) is vector  # another encoder's width


def test_reranker_weights_round_trip_with_language_means():
    from streams.knowledge import Reranker, default_reranker

    shipped = default_reranker(hybrid=True)
    assert set(shipped.language_means) == {"en", "zh"}
    assert all(v.shape == (512,) for v in shipped.language_means.values())
    again = Reranker.from_dict(shipped.to_dict())
    assert again.version == shipped.version and again.threshold == shipped.threshold
    assert np.allclose(again.coef, shipped.coef)
    assert np.allclose(again.language_means["zh"], shipped.language_means["zh"], atol=1e-5)
    assert default_reranker(hybrid=False).language_means == {}
