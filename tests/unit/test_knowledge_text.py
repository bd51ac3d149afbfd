"""Keyword tokens and chunking of knowledge documents."""

from __future__ import annotations

import pytest

from streams.knowledge import MAX_CHUNK_CHARS, Document, chunk_document, detect_language, tokenize
from streams.knowledge._concepts import EN_EXPANSION, ZH_EXPANSION, expand_query


def test_chinese_is_unigrams_and_bigrams_without_particles():
    tokens = tokenize("发票抬头")
    assert tokens == ["发", "发票", "票", "票抬", "抬", "抬头", "头"]
    # Particles are dropped as unigrams but kept inside bigrams.
    assert "的" not in tokenize("我的发票")
    assert "的发" in tokenize("我的发票")


def test_english_is_lowercased_stemmed_and_stopworded():
    assert tokenize("Where are my Refunds?") == ["refund"]
    assert tokenize("shipped") == tokenize("shipping") == tokenize("ships")
    assert tokenize("invoices") == tokenize("invoice")
    assert tokenize("cancelled") == tokenize("cancel")


def test_mixed_text_and_full_width_characters():
    assert tokenize("我的ｏｒｄｅｒ到了吗") == ["我的", "order", "到", "到了", "了吗"]
    assert "20481234" in tokenize("订单SO-20481234")


def test_language_detection():
    assert detect_language("亲，在吗？我的快递到哪了") == "zh"
    assert detect_language("where is my parcel") == "en"
    assert detect_language("我的order什么时候到") == "zh"


def test_short_document_is_one_chunk_with_title_context():
    doc = Document("faq-1", "Refunds", "Refunds take 3-5 days.", tags=("refund",))
    [chunk] = chunk_document(doc)
    assert chunk.chunk_id == "faq-1#0"
    assert chunk.text == "Refunds take 3-5 days."
    assert chunk.indexed_text.startswith("Refunds\n")
    assert chunk.language == "en"
    assert chunk.tags == ("refund",)


def test_long_document_splits_at_paragraphs_then_sentences_within_bound():
    paragraphs = ["第一段。" * 30, "Second paragraph. " * 40, "短的一段。"]
    doc = Document("long", "标题", "\n\n".join(paragraphs))
    chunks = chunk_document(doc, max_chars=100)
    assert len(chunks) > 3
    assert [c.chunk_id for c in chunks] == [f"long#{n}" for n in range(len(chunks))]
    assert all(0 < len(c.text) <= 100 for c in chunks)
    # Nothing is lost (whitespace aside).
    joined = "".join(c.text for c in chunks).replace("\n", "").replace(" ", "")
    assert joined == "".join(paragraphs).replace(" ", "")
    # Sentence ends are respected: no chunk starts in the middle of "第一段。".
    assert all(not c.text.startswith(("一段", "段。")) for c in chunks)


def test_an_unbroken_run_is_cut_at_the_bound():
    doc = Document("blob", "t", "x" * 1000)
    chunks = chunk_document(doc)
    assert all(len(c.text) <= MAX_CHUNK_CHARS for c in chunks)
    assert "".join(c.text for c in chunks) == "x" * 1000


def test_chunking_is_deterministic():
    doc = Document("d", "Title", "One.\n\nTwo. Three.\n\n" + "Four. " * 100)
    assert chunk_document(doc) == chunk_document(doc)


def test_document_validation_and_fingerprint():
    with pytest.raises(ValueError, match="document_id"):
        Document("a#1", "t", "b")
    a = Document("a", "t", "退款说明")
    assert a.language == "zh"
    assert a.fingerprint == Document("a", "t", "退款说明", language="zh").fingerprint
    assert a.fingerprint != Document("a", "t", "退款说明。").fingerprint


@pytest.mark.parametrize(
    ("text", "suffix"),
    [
        ("收到的杯子是碎的", ZH_EXPANSION),
        ("你们发错货了，我买的是黑色", ZH_EXPANSION),
        ("盘子到的时候已经裂开了", ZH_EXPANSION),
        ("the cup I got is broken", EN_EXPANSION),
        ("box was crushed and the plates inside are shattered", EN_EXPANSION),
        ("you sent me the wrong item!! I ordered blue not red", EN_EXPANSION),
        # Not a fault on arrival, or not a fault of the goods: searched as written.
        ("耳机坏了能保修吗", ""),
        ("speaker is broken, is it under warranty", ""),
        ("优惠券用不了", ""),
        ("my promo code doesn't work at checkout", ""),
        ("能不能用礼盒包起来", ""),
        ("how long does shipping take", ""),
        # A review found these expanded by the first version (a fault word alone): product names,
        # pre-sale questions, the customer's own choice, software, a negation, another language's word.
        ("碎花裙有M码吗", ""),
        ("破洞牛仔裤有29码吗", ""),
        ("碎屏险怎么买", ""),
        ("这个保温杯会漏水吗", ""),
        ("钢化膜防划痕吗", ""),
        ("瑕疵品特价区在哪", ""),
        ("I ordered the wrong size, can I exchange it?", ""),
        ("I'm torn between the M and the L, which runs bigger?", ""),
        ("My coupon code is broken", ""),
        ("The link in your email is broken", ""),
        ("Do you have ripped jeans in size 30?", ""),
        ("If the box is not broken can I still return it?", ""),
        ("包装没有破损，可以退吗", ""),
        ("Do you sell the 碎花 dress in size M?", ""),
        ("the tracking link in your email is broken, where else can i see where my parcel is", ""),
        ("收到的短信里链接打不开", ""),
        ("I got the wrong size because I misread the chart, can I exchange?", ""),
        ("I got the wrong bill this month", ""),
        ("Our webhook delivery is broken, events are missing", ""),
        ("My screen got scratched, do you sell screen protectors?", ""),
        ("新买的手机碎屏险怎么办理", ""),
        ("发错地址了，能改吗", ""),
        ("你们没有发错，是我自己买错了尺码，能换吗", ""),
        ("my headphones broke after two months, is that covered by the warranty?", ""),
        # Reports of what came, also full-width, traditional and with the word "guarantee".
        ("the mug arrived smashed, do you guarantee a replacement?", EN_EXPANSION),
        ("ｔｈｅ ｃｕｐ ｉ ｇｏｔ ｉｓ ｂｒｏｋｅｎ", EN_EXPANSION),
        ("收到的杯子碎了", ZH_EXPANSION),
        ("你們發錯貨了", ZH_EXPANSION),
        ("package came yesterday but theres only 2 shirts in it, i paid for 3", EN_EXPANSION),
        ("wrong colour sent - i picked navy and this is clearly green", EN_EXPANSION),
        ("The speaker I received won't turn on at all, brand new", EN_EXPANSION),
        ("收到货了但是瓶子漏了", ZH_EXPANSION),
        ("The vase came in pieces", EN_EXPANSION),
        ("You shipped me a size 8 instead of a 6", EN_EXPANSION),
        ("They delivered someone else's order", EN_EXPANSION),
        ("收到的杯子是碎的，保修吗", ZH_EXPANSION),  # on arrival: the damaged-item article's
        ("发给我的是红色的，我买的是蓝色", ZH_EXPANSION),
    ],
)
def test_a_reported_damaged_or_wrong_item_is_searched_with_the_faqs_words_for_it(
    text: str, suffix: str
) -> None:
    assert expand_query(text) == text + suffix
