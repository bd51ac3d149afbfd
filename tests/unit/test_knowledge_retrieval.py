"""Retrieval with the real multilingual encoder (built into var/models by the session fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.knowledge import Document, KnowledgeIndex, SentenceEncoder, load_demo_documents
from streams.knowledge._data import load_questions, questions_from_rows, read_jsonl

MODELS_DIR = Path(__file__).resolve().parents[2] / "var" / "models"
BENCH_DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


@pytest.fixture(scope="session")
def encoder() -> SentenceEncoder:
    from streams.assistant.encoder import load_encoder
    from streams.assistant.intent import build_models

    build_models(MODELS_DIR)  # fast when the artifacts are current
    return load_encoder(MODELS_DIR)


@pytest.fixture(scope="session")
def demo_index(encoder: SentenceEncoder) -> KnowledgeIndex:
    index = KnowledgeIndex(encoder)
    index.upsert_many(load_demo_documents())
    return index


@pytest.mark.parametrize(
    ("question", "document_id"),
    [
        # Only a Chinese document answers these English questions (BM25 cannot match them).
        ("how do reward points work", "zh-member-points"),
        ("what do gold members get", "zh-member-points"),
        ("can I pay cash on delivery in china", "zh-cash-on-delivery"),
        # ... and only an English document these Chinese ones.
        ("礼品卡会过期吗", "en-gift-cards"),
        ("学生折扣是多少", "en-student-discount"),
        ("礼品包装要多少钱", "en-gift-wrapping"),
    ],
)
def test_cross_language_question_finds_the_only_answer(demo_index, question, document_id):
    hits = demo_index.search(question, 3)
    assert hits[0].document_id == document_id, [(h.document_id, h.scores) for h in hits]


@pytest.mark.parametrize(
    ("question", "document_id"),
    [
        ("how do I get an invoice", "en-invoice"),
        ("怎么开发票", "zh-invoice"),
        ("亲 退款多久到账", "zh-refund-timeline"),
    ],
)
def test_same_language_answer_is_first_and_relevant(demo_index, question, document_id):
    hits = demo_index.search(question, 3)
    assert hits[0].document_id == document_id
    assert hits[0].relevant
    assert hits[0].scores.cosine > 0.3


@pytest.mark.parametrize("question", ["what's the weather like tomorrow", "帮我写一篇作文", "红烧肉怎么做"])
def test_out_of_scope_question_has_no_relevant_hit(demo_index, question):
    assert not any(h.relevant for h in demo_index.search(question, 5))


def test_heldout_quality_floor(demo_index):
    """A regression guard well under the measured figures (benchmarks/retrieval.py prints them)."""
    questions = [q for q in load_questions("heldout_questions.jsonl") if q.document_id]
    top1 = sum(demo_index.search(q.text, 1)[0].document_id == q.document_id for q in questions)
    assert top1 / len(questions) >= 0.78


@pytest.mark.parametrize(
    ("question", "removed", "document_id"),
    [
        # The question's own-language article is gone; its other-language twin answers it.
        ("how do I get an invoice", "en-invoice", "zh-invoice"),
        ("how do I cancel my order", "en-cancel-order", "zh-cancel-order"),
        ("退款多久到账", "zh-refund-timeline", "en-refund-timeline"),
        ("忘记密码了怎么办", "zh-password-reset", "en-password-reset"),
    ],
)
def test_cross_language_twin_wins_over_same_language_neighbours(encoder, question, removed, document_id):
    index = KnowledgeIndex(encoder)
    index.upsert_many(d for d in load_demo_documents() if d.document_id != removed)
    hits = index.search(question, 3)
    assert hits[0].document_id == document_id, [(h.document_id, h.scores) for h in hits]
    assert hits[0].relevant


def test_no_relevant_hit_when_only_the_neighbours_of_the_answer_remain(encoder):
    index = KnowledgeIndex(encoder)
    index.upsert_many(d for d in load_demo_documents() if not d.document_id.endswith("-invoice"))
    assert not any(h.relevant for h in index.search("怎么开发票", 5))


def test_independent_telecom_set_quality_floor(encoder):
    """The benchmarks' telecom FAQ was never trained or tuned on; a guard under the measured 0.845."""
    index = KnowledgeIndex(encoder)
    index.upsert_many(Document.from_dict(r) for r in read_jsonl(BENCH_DATA / "telecom_faq.jsonl"))
    questions = questions_from_rows(read_jsonl(BENCH_DATA / "telecom_questions.jsonl"))
    answerable = [q for q in questions if q.document_id]
    top1 = sum(index.search(q.text, 1)[0].document_id == q.document_id for q in answerable)
    assert top1 / len(answerable) >= 0.8
    out_of_scope = [q for q in questions if q.document_id is None]
    answered = sum(any(h.relevant for h in index.search(q.text, 3)) for q in out_of_scope)
    assert answered / len(out_of_scope) <= 0.15


def test_a_cross_language_top_hit_gives_way_to_its_translation(demo_index: KnowledgeIndex) -> None:
    """Both versions of a translated article answer equally well: the customer gets the one in
    their language (before, this English question was answered from the Chinese twin)."""
    matrix = demo_index._vectors()
    assert matrix is not None
    assert matrix.translation_of("en-shipping-times") == "zh-shipping-times"
    assert matrix.translation_of("zh-shipping-times") == "en-shipping-times"
    assert matrix.translation_of("zh-member-points") is None  # only in Chinese
    hits = demo_index.search("how fast is overnight delivery to chicago", 3)
    assert hits[0].document_id == "en-shipping-times"


def test_an_article_whose_twin_is_gone_has_no_translation(encoder: SentenceEncoder) -> None:
    index = KnowledgeIndex(encoder)
    index.upsert_many(d for d in load_demo_documents() if d.document_id != "zh-shipping-times")
    matrix = index._vectors()
    assert matrix is not None
    assert matrix.translation_of("en-shipping-times") is None
    # Nor does any other article get mistaken for a translation of its neighbour.
    assert matrix.translation_of("zh-order-status") == "en-order-status"
    assert all(
        matrix.translation_of(d) in (None, "zh-" + d[3:] if d.startswith("en-") else "en-" + d[3:])
        for d in matrix.document_ids
    )


def test_translations_are_paired_by_their_ids_or_urls_without_the_language_tag() -> None:
    from streams.knowledge._index import translation_key

    def key(document_id: str, language: str, url: str = "") -> str | None:
        return translation_key(
            Document(document_id=document_id, title="t", body="b", language=language, url=url)
        )

    assert key("en-returns", "en") == key("zh-returns", "zh") is not None
    assert key("returns_en-US", "en-US") == key("returns_zh-hans", "zh") is not None
    help_centre = "https://help.example.com/hc/{}/articles/1200"
    assert key("a1", "en", help_centre.format("en-us")) == key("b7", "zh", help_centre.format("zh-cn"))
    assert key("en-returns", "en") != key("zh-refunds", "zh")
    # No language tag of the document's own language: nothing to pair by ("en" inside a word is none).
    assert key("returns", "en") is None
    assert key("en-returns", "zh") is None
    assert key("when-to-open", "en") is None


def test_only_a_locale_region_after_the_language_tag_is_taken_out_of_the_key() -> None:
    from streams.knowledge._index import translation_key

    def key(document_id: str, language: str) -> str | None:
        return translation_key(Document(document_id=document_id, title="t", body="b", language=language))

    assert key("returns_en-gb", "en") == key("returns_zh-hans-cn", "zh") == key("returns_pt-br", "pt")
    assert key("zh-tw-returns", "zh") == key("en-returns", "en")
    # A word after the tag is part of the article's name, not a region ("in-store", "my account").
    assert key("en-in-store-pickup", "en") != key("zh-store-pickup", "zh")
    assert key("en-my-account", "en") != key("zh-account", "zh")
    # A region the document's own language declares is one, even if not a common one.
    assert key("en-in-store-pickup", "en-IN") == key("zh-store-pickup", "zh")


def test_a_shared_key_pairs_again_once_it_is_one_document_per_language() -> None:
    index = KnowledgeIndex(None)
    index.upsert_many(
        [
            Document(
                "faq-shipping", "Shipping", "We ship within 3 days.", "en", url="https://s.example/en/help"
            ),
            Document(
                "faq-returns", "Returns", "Return within 7 days.", "en", url="https://s.example/en/help"
            ),
            Document("帮助中心", "退货", "七天内可退货。", "zh", url="https://s.example/zh/help"),
        ]
    )
    assert index._translation("帮助中心", "en") is None  # two English articles: which one is unknown
    index.delete("faq-shipping")
    assert index._translation("faq-returns", "zh") == "帮助中心"
    assert index._translation("帮助中心", "en") == "faq-returns"


def test_a_cross_language_top_hit_gives_way_to_its_translation_the_encoder_does_not_pair(
    demo_index: KnowledgeIndex,
) -> None:
    """The encoder does not see en/zh-return-policy as each other's nearest (similarity 0.40), so
    this Chinese question was answered from the English article; their ids pair them."""
    matrix = demo_index._vectors()
    assert matrix is not None and matrix.translation_of("zh-return-policy") is None
    hits = demo_index.search("不喜欢可以退吗", 3, intent="return_exchange")
    assert hits[0].document_id == "zh-return-policy", [(h.document_id, h.scores) for h in hits]


def test_a_cross_language_hit_whose_translation_does_not_match_is_not_answered(
    encoder: SentenceEncoder,
) -> None:
    """ "how tall is mount everest" matched the Chinese size guide (身高, height) well enough to
    answer from it, while the English size guide, which says the same, did not match at all: the
    match is on wording, not on what the article says. Nothing is answered."""
    index = KnowledgeIndex(encoder)
    index.upsert_many(load_demo_documents())
    hits = index.search("how tall is mount everest", 3, intent="out_of_scope")
    assert hits[0].document_id == "zh-size-guide"
    assert not any(h.relevant for h in hits), [(h.document_id, h.scores) for h in hits]


def test_a_cross_language_article_without_a_translation_is_still_answered(demo_index: KnowledgeIndex) -> None:
    hits = demo_index.search("how do reward points work", 3, intent="discount_coupon")
    assert hits[0].document_id == "zh-member-points" and hits[0].relevant


def test_a_top_hit_is_as_relevant_as_its_translation(demo_index: KnowledgeIndex) -> None:
    """The English exchange article ranks first but alone is below the relevance threshold (0.27);
    its Chinese translation is relevant for the question (0.53). One article in two languages: the
    customer gets the answer in English instead of a "did you mean"."""
    hits = demo_index.search("I'd like the same coat in red instead of black", 3, intent="return_exchange")
    assert hits[0].document_id == "en-exchange" and hits[0].relevant, [
        (h.document_id, h.scores) for h in hits
    ]


def test_a_deleted_translation_is_no_longer_paired() -> None:
    index = KnowledgeIndex(None)
    index.upsert_many(load_demo_documents())
    assert index._translation("en-return-policy", "zh") == "zh-return-policy"
    index.delete("zh-return-policy")
    assert index._translation("en-return-policy", "zh") is None
    # Two documents of one language with the same key: which one is the translation is unknown.
    index.upsert(Document("zh-return-policy", "退货政策", "7天无理由退货", "zh"))
    index.upsert(Document("returns-copy", "退货", "退货说明", "zh", url="zh-return-policy"))
    assert index._translation("en-return-policy", "zh") is None


@pytest.mark.parametrize("question", ["大学生有优惠吗", "学生党有什么优惠"])
def test_an_article_only_in_the_other_language_beats_a_neighbour_whose_translation_it_outranks(
    demo_index: KnowledgeIndex, question: str
) -> None:
    """The student discount exists in English only. The Chinese coupon rules rank first on shared
    words (优惠) and both are relevant; in English the student discount ranks above the coupon
    rules' own translation, so it is the answer (before: zh-coupon-rules)."""
    hits = demo_index.search(question, 3, intent="discount_coupon")
    assert hits[0].document_id == "en-student-discount" and hits[0].relevant, [
        (h.document_id, h.scores.relevance) for h in hits
    ]


def test_an_article_only_in_the_other_language_beats_an_untranslated_neighbour_it_is_nearest_to(
    demo_index: KnowledgeIndex,
) -> None:
    """Both the Chinese cash-on-delivery and the English buy-now-pay-later articles exist in one
    language only and both are relevant; the English one is the nearest English article in meaning
    (before: zh-cash-on-delivery answered a question about Afterpay)."""
    hits = demo_index.search("可以用Afterpay付款吗", 3, intent="payment_problem")
    assert hits[0].document_id == "en-buy-now-pay-later" and hits[0].relevant, [
        (h.document_id, h.scores.relevance) for h in hits
    ]


def test_a_relevant_one_language_article_does_not_jump_an_unsure_top_hit(demo_index: KnowledgeIndex) -> None:
    """Under a top hit that is not relevant, a lower relevant hit is mostly a wrong article
    (`grounding`): the order is left alone and nothing is answered."""
    hits = demo_index.search("can I pay in instalments", 3, intent="payment_problem")
    assert hits[0].document_id == "en-buy-now-pay-later" and not hits[0].relevant, [
        (h.document_id, h.scores.relevance) for h in hits
    ]
    assert "zh-cash-on-delivery" in [h.document_id for h in hits]


def test_a_cross_language_top_hit_whose_translation_the_ranker_doubts_is_not_answered(
    demo_index: KnowledgeIndex,
) -> None:
    """Fabric is not in the FAQ; the question matched only the Chinese size guide (no shared word,
    weak cosine) and the ranker gives the English size guide 0.3-0.45 for it: no answer (before:
    the size guide, from the translation inheriting the Chinese version's relevance)."""
    hits = demo_index.search("is this sweater made of wool", 3, intent="product_question")
    assert not any(h.relevant for h in hits), [(h.document_id, h.scores) for h in hits]


def test_a_barely_relevant_one_language_article_does_not_jump_a_relevant_top_hit(
    demo_index: KnowledgeIndex,
) -> None:
    """The Chinese cash-on-delivery article is as relevant as the payment methods for a PayPal
    question (0.41, just past the threshold): not enough to go above them (before: answered from
    cash on delivery)."""
    hits = demo_index.search("can I use paypal", 3, intent="payment_problem")
    assert hits[0].document_id == "en-payment-methods" and hits[0].relevant, [
        (h.document_id, h.scores.relevance) for h in hits
    ]


@pytest.mark.parametrize(
    ("question", "document_id"),
    [
        # Reported faults share no word with "破损、发错或有质量问题" / "damaged, wrong or faulty":
        # before the expansion, en-gift-wrapping was the answer to the first (relevant, cited).
        ("收到的杯子是碎的", "zh-damaged-item"),
        ("快递送来的花瓶摔裂了", "zh-damaged-item"),
        ("the mug arrived smashed into pieces", "en-damaged-item"),
        ("you sent me the wrong shoes, these aren't what I ordered", "en-damaged-item"),
    ],
)
def test_a_reported_damaged_or_wrong_item_is_answered_from_the_damaged_item_article(
    demo_index: KnowledgeIndex, question: str, document_id: str
) -> None:
    hits = demo_index.search(question, 3)
    assert hits[0].document_id == document_id, [(h.document_id, h.scores) for h in hits]
    assert hits[0].relevant


def test_a_fault_in_use_under_warranty_stays_the_warranty_articles(demo_index: KnowledgeIndex) -> None:
    hits = demo_index.search("my headphones broke after two months, is that covered by the warranty?", 3)
    assert hits[0].document_id == "en-warranty", [(h.document_id, h.scores) for h in hits]


def _chinese_heldout_questions() -> list[str]:
    return [q.text for q in load_questions("heldout_questions.jsonl") if q.language == "zh"]


def test_a_question_in_traditional_chinese_is_searched_as_its_simplified_form(demo_index):
    """Customers in Hong Kong and Taiwan type traditional characters (退貨 for 退货): every Chinese
    held-out question, converted to traditional, gets the same hits with the same relevance as
    written. Before, keyword search matched few of its words and the assistant answered 65% of
    them right against 84% (benchmarks/RESULTS.md, twenty-fourth session)."""
    import opencc

    s2t = opencc.OpenCC("s2t")
    questions = _chinese_heldout_questions()
    changed = 0
    for question in questions:
        traditional = s2t.convert(question)
        changed += traditional != question
        want = [
            (h.document_id, round(h.scores.relevance, 6), h.relevant) for h in demo_index.search(question, 3)
        ]
        got = [
            (h.document_id, round(h.scores.relevance, 6), h.relevant)
            for h in demo_index.search(traditional, 3)
        ]
        assert got == want, f"{traditional!r} (from {question!r})"
    assert changed > len(questions) // 2  # the conversion did change most of them


def test_an_article_in_traditional_chinese_answers_a_simplified_question(encoder):
    """The same fold on the documents' side: a help centre written in traditional characters."""
    import opencc

    s2t = opencc.OpenCC("s2t")
    documents = [
        Document(d.document_id, s2t.convert(d.title), s2t.convert(d.body), d.language, d.tags, d.url)
        if d.language == "zh"
        else d
        for d in load_demo_documents()
    ]
    index = KnowledgeIndex(encoder)
    index.upsert_many(documents)
    hits = index.search("退货要在几天内申请", 3)
    assert hits[0].document_id == "zh-return-policy" and hits[0].relevant, [
        (h.document_id, h.scores) for h in hits
    ]


@pytest.fixture(scope="module")
def index_with_a_stub(encoder: SentenceEncoder) -> KnowledgeIndex:
    index = KnowledgeIndex(encoder)
    index.upsert_many([*load_demo_documents(), Document("stub", "t", "b")])
    return index


@pytest.mark.parametrize("message", ["是的", "好的", "嗯嗯", "谢谢", "不是", "在吗"])
def test_a_document_too_short_to_be_about_anything_is_not_found_by_meaning(index_with_a_stub, message):
    """A new user's walkthrough: a stub document {title "t", body "b"} was the top hit, relevant
    (0.97-0.99), for every content-free message, and the assistant answered "是的" with "b"."""
    hits = index_with_a_stub.search(message, 3)
    assert all(h.document_id != "stub" for h in hits), [(h.document_id, h.scores) for h in hits]
    assert not any(h.relevant for h in hits), [(h.document_id, h.scores) for h in hits]


def test_a_short_document_is_still_found_by_its_words(index_with_a_stub, encoder):
    hits = index_with_a_stub.search("b", 3)
    assert hits and hits[0].document_id == "stub"
    short = KnowledgeIndex(encoder)
    short.upsert_many([*load_demo_documents(), Document("hours", "营业时间", "每天 9:00-18:00")])
    # A short document that says something is still found by meaning (no word in common).
    top = short.search("what are your opening hours", 3)[0]
    assert top.document_id == "hours" and top.relevant and top.scores.bm25 == 0.0, top
