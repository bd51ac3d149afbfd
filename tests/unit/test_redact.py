"""PII redaction: what is masked in realistic zh and en support messages, what is not (order and
tracking numbers, dates, prices), per-tenant policy, and the projector applying it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from switchboard.v1 import events_pb2 as pb

from schemas.events import Event, LogPosition
from streams.privacy import (
    CARD,
    CN_ID,
    EMAIL,
    PHONE,
    RedactionPolicy,
    cn_id_valid,
    find_pii,
    luhn_valid,
    redact,
    redact_event,
    use_policy,
)
from streams.projector import project


def with_luhn(prefix: str) -> str:
    """`prefix` plus the digit that makes it pass the Luhn check."""
    return next(prefix + str(d) for d in range(10) if luhn_valid(prefix + str(d)))


def with_id_check(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return first17 + "10X98765432"[sum(int(c) * w for c, w in zip(first17, weights, strict=True)) % 11]


UNIONPAY = with_luhn("622202123456789012")  # 19 digits
VISA = "4111111111111111"
ID_A = "11010519491231002X"
ID_B = with_id_check("44030819900307523")


def test_checksums() -> None:
    assert luhn_valid(VISA) and luhn_valid(UNIONPAY) and not luhn_valid("4111111111111112")
    assert cn_id_valid(ID_A) and cn_id_valid(ID_B) and cn_id_valid(ID_A.lower())
    assert not cn_id_valid(ID_A[:-1] + "1")  # wrong check character
    assert not cn_id_valid(with_id_check("11010519490231002"))  # born on 31 February 1949
    assert not cn_id_valid("12345")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Chinese customers
        ("我的手机号是13812345678，麻烦回电", "我的手机号是138****5678，麻烦回电"),
        (
            "电话：+86 139-1234-5678，邮箱 zhang.san@example.com 谢谢",
            "电话：+86 139-****-5678，邮箱 z***@example.com 谢谢",
        ),
        ("联系我0086 15012345678", "联系我0086 150****5678"),
        (f"身份证号{ID_A}，请帮我核实", "身份证号110***********002X，请帮我核实"),
        (
            f"退款请打到卡号 {UNIONPAY[:4]} {UNIONPAY[4:8]} {UNIONPAY[8:12]} {UNIONPAY[12:16]} {UNIONPAY[16:]}",
            f"退款请打到卡号 **** **** **** ***{UNIONPAY[15]} {UNIONPAY[16:]}",
        ),
        (
            f"邮箱是li_si-88@mail.qq.com，身份证{ID_B}",
            f"邮箱是l***@mail.qq.com，身份证{ID_B[:3]}***********{ID_B[-4:]}",
        ),
        # English customers
        ("Please call me on +1 (415) 555-2671 after 5pm", "Please call me on +1 (***) ***-2671 after 5pm"),
        (
            "my number is (212) 555-0199, email JOHN.DOE+shop@Example.co.uk",
            "my number is (***) ***-0199, email J***@Example.co.uk",
        ),
        (f"charge my card {VISA} please", "charge my card ************1111 please"),
        ("card 4111-1111-1111-1111 exp 12/28 cvv later", "card ****-****-****-1111 exp 12/28 cvv later"),
        ("UK mobile +44 7700 900123", "UK mobile +44 **** **0123"),
        ("HK: +852 9123 4567", "HK: +852 **** 4567"),
    ],
)
def test_pii_is_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        # Order, tracking and invoice numbers: long digit strings, some Luhn-valid by chance.
        f"订单号 {with_luhn('202611301234567')}，什么时候发货？",
        f"我的订单{with_luhn('2026113012345678')}还没到",
        f"快递单号 {with_luhn('77301234567890')} 查不到物流",
        f"运单号：{ID_A}",  # a valid-looking ID introduced as a waybill number
        f"order #{with_luhn('411111111111111')} hasn't shipped",
        f"Order No. {VISA} was cancelled",
        f"tracking number {with_luhn('123456789012')}9 shows delivered",
        "SF1234567890123 到哪了",  # SF Express: letters glued to the digits
        "YT2034567891234 and JD0012345678901",
        "单号 SB20261130，订单 DD202611301234",
        # Dates, times, money, quantities, versions
        "我 2026-11-30 14:05 下的单，2026年11月30日付了 1299.00 元",
        "delivered on 11/30/2026 at 14:05, paid $1,299.00 for 2 items",
        "20261130 的订单",
        "model iPhone 17 Pro 256GB, version 26.1.2",
        # Digit strings that fail the checksums
        "card 4111 1111 1111 1112",
        "身份证号110105194912310021",  # wrong check character
        "phone 1234",
        # Not an e-mail
        "email me at zhang at example dot com",
    ],
)
def test_near_misses_are_left_alone(text: str) -> None:
    assert redact(text) == text, find_pii(text)


def test_only_the_configured_kinds_are_masked() -> None:
    text = f"13812345678 a@b.cn {VISA} {ID_A}"
    assert redact(text, {EMAIL}) == f"13812345678 a***@b.cn {VISA} {ID_A}"
    assert redact(text, {PHONE, CARD}) == f"138****5678 a@b.cn ************1111 {ID_A}"
    assert redact(text, {CN_ID}) == f"13812345678 a@b.cn {VISA} 110***********002X"
    assert redact(text, set()) == text


def test_policy_per_tenant() -> None:
    policy = RedactionPolicy.parse("all", "lab=none; acme = email,phone")
    assert policy.kinds_for("anyone") == {EMAIL, PHONE, CARD, CN_ID}
    assert policy.redact("lab", "13812345678") == "13812345678"
    assert policy.redact("acme", f"13812345678 {VISA}") == f"138****5678 {VISA}"
    assert RedactionPolicy.parse("none").redact("x", "a@b.cn") == "a@b.cn"
    with pytest.raises(ValueError, match="unknown PII kinds"):
        RedactionPolicy.parse("email,passport")
    with pytest.raises(ValueError, match="tenant=kinds"):
        RedactionPolicy.parse("all", "acme")


def test_settings_refuse_a_policy_that_does_not_parse() -> None:
    from pydantic import ValidationError

    from services.settings import Settings

    with pytest.raises(ValidationError, match="unknown PII kinds"):
        Settings(pii_redact="email,passport")
    with pytest.raises(ValidationError, match="tenant=kinds"):
        Settings(pii_redact_tenants="acme")
    assert Settings(pii_redact="email,phone", pii_redact_tenants="lab=none").pii_redact == "email,phone"


def test_redaction_is_deterministic() -> None:
    text = "13812345678 / a@b.cn / " + VISA
    assert redact(text) == redact(text) == redact(redact(text))


def _message(tenant: str, text: str, offset: int = 0) -> tuple[Event, LogPosition]:
    event = Event(event_id=f"e{offset}", tenant_id=tenant, conversation_id="c1", schema_version=1)
    event.occurred_at.FromDatetime(datetime(2026, 11, 30, 8, 0, tzinfo=UTC))
    event.message_received.CopyFrom(pb.MessageReceived(client_message_id=f"m{offset}", text=text))
    return event, LogPosition(0, offset)


def test_the_projector_writes_masked_text_everywhere() -> None:
    use_policy(RedactionPolicy.parse("all", "lab=none"))
    try:
        original = f"手机13812345678 邮箱 wang@example.com 卡号{VISA}"
        batch = project([_message("acme", original), _message("lab", original, 1)])
        texts = [r[7] for r in batch.rows["raw_messages"]]
        payloads = [r[10] for r in batch.rows["raw_events"]]
        assert texts[0] == "手机138****5678 邮箱 w***@example.com 卡号************1111"
        assert "13812345678" not in payloads[0] and "wang@" not in payloads[0] and VISA not in payloads[0]
        assert texts[1] == original and "13812345678" in payloads[1]  # this tenant opted out
        # Projecting again gives the same rows (the projector's idempotence depends on it).
        assert project([_message("acme", original)]).rows["raw_messages"] == [batch.rows["raw_messages"][0]]
    finally:
        use_policy(RedactionPolicy.parse("all"))


def test_events_without_pii_are_not_copied() -> None:
    event, _ = _message("acme", "where is my order SB20261130?")
    assert redact_event(event) is event
    closed = Event(event_id="x", tenant_id="acme", conversation_id="c")
    closed.conversation_closed.CopyFrom(pb.ConversationClosed(resolution="answered"))
    assert redact_event(closed) is closed


# Digits as Chinese input methods type them in full-width mode (and other scripts' decimal digits):
# the same numbers, masked alike; they used to raise KeyError in the Luhn check, so the projector
# could not make a row of the message at all.
WIDE = str.maketrans("0123456789+-()X ", "０１２３４５６７８９＋－（）Ｘ　")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("我的手机号是" + "13812345678".translate(WIDE) + "，麻烦回电", "我的手机号是138****5678，麻烦回电"),
        ("电话：" + "+86 139-1234-5678".translate(WIDE) + "谢谢", "电话：+86 139-****-5678谢谢"),
        ("卡号" + "4111 1111 1111 1111".translate(WIDE), "卡号**** **** **** 1111"),
        ("退款到" + VISA.translate(WIDE) + "这张卡", "退款到************1111这张卡"),
        ("身份证号" + ID_A.translate(WIDE) + "，请核实", "身份证号110***********002X，请核实"),
        # What is not masked stays as typed (here the wide space after "call").
        ("call +1 (415) 555-2671".translate(WIDE), "call\u3000+1 (***) ***-2671"),
        # Arabic-Indic digits: a Luhn-valid card number.
        ("card " + VISA.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")), "card ************1111"),
        # Full-width with ASCII signs, ASCII with full-width signs.
        ("手机 " + "138".translate(WIDE) + "-" + "12345678".translate(WIDE), "手机 138-****5678"),
        ("手机 138－1234－5678", "手机 138-****-5678"),
    ],
)
def test_wide_and_other_scripts_digits_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "订单号 " + with_luhn("202611301234567").translate(WIDE) + "，什么时候发货？",
        "我 ２０２６－１１－３０ １４：０５ 下的单，付了 １２９９．００ 元",
        "card " + "4111 1111 1111 1112".translate(WIDE),
        "身份证号１１０１０５１９４９１２３１００２１",  # wrong check character
        "ＳＦ１２３４５６７８９０１２３ 到哪了",  # full-width letters glued to the digits
    ],
)
def test_wide_near_misses_are_left_alone(text: str) -> None:
    assert redact(text) == text, find_pii(text)


def test_the_projector_makes_rows_of_messages_with_wide_digits() -> None:
    text = "卡号 " + "4111 1111 1111 1111".translate(WIDE) + " 手机 " + "13812345678".translate(WIDE)
    batch = project([_message("acme", text)])
    assert [r[7] for r in batch.rows["raw_messages"]] == ["卡号 **** **** **** 1111 手机 138****5678"]
