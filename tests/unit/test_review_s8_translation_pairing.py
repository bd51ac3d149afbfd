"""Review of a468f44 (session 8): translations paired by id/URL (`translation_key`).

A pairing decides answers: a cross-language top hit whose "translation" is not rated is not
answered from (capped below the threshold), and one that is rated is promoted in its place with
the top hit's relevance. A wrong pair therefore loses a right answer or gives a wrong one.
"""

from streams.knowledge._document import Document
from streams.knowledge._index import KnowledgeIndex


def test_review_s8_articles_that_share_one_url_are_no_ones_translation() -> None:
    index = KnowledgeIndex(None)
    # A CMS export where articles without a page of their own link the help centre's home.
    index.upsert_many(
        [
            Document(
                "faq-shipping", "Shipping", "We ship within 3 days.", "en", url="https://shop.example/en/help"
            ),
            Document(
                "faq-returns", "Returns", "Return within 7 days.", "en", url="https://shop.example/en/help"
            ),
            Document("帮助中心", "退货", "七天内可退货。", "zh", url="https://shop.example/zh/help"),
        ]
    )
    # The zh document cannot be the translation of both; which one it is is unknown.
    pairs = {d: index._translation(d, "zh") for d in ("faq-shipping", "faq-returns")}
    assert pairs == {"faq-shipping": None, "faq-returns": None}, pairs


def test_review_s8_a_two_letter_word_after_the_language_is_not_a_region() -> None:
    index = KnowledgeIndex(None)
    index.upsert_many(
        [
            Document(
                "en-no-refund-items", "Items we do not refund", "Gift cards and food are final sale.", "en"
            ),
            Document("zh-refund-items", "如何退款", "在订单页面申请退款。", "zh"),
        ]
    )
    assert index._translation("en-no-refund-items", "zh") is None
