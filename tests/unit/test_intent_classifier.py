"""IntentClassifier on the built ONNX artifacts (built once into var/models; a no-op when current)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.assistant.intent import (
    LABELS,
    CascadePolicy,
    IntentClassifier,
    build_models,
    load_intent_classifier,
)

MODELS_DIR = Path(__file__).resolve().parents[2] / "var" / "models"


@pytest.fixture(scope="module")
def classifier() -> IntentClassifier:
    build_models(MODELS_DIR)
    return load_intent_classifier(MODELS_DIR)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("我要人工客服", "talk_to_human"),
        ("在吗", "greeting"),
        ("tk 什么时候到账", "refund"),
        ("发票抬头写错了 要重开", "invoice"),
        ("where is my order #A12345??", "order_status"),
        ("i want to talk to a real person", "talk_to_human"),
        ("thanks, bye!", "thanks_goodbye"),
        ("my card keeps getting declined at checkout", "payment_problem"),
    ],
)
def test_obvious_messages(classifier: IntentClassifier, text: str, label: str) -> None:
    (decision,) = classifier.classify([text])
    assert decision.label == label


def test_decision_fields_and_batch_order(classifier: IntentClassifier) -> None:
    texts = ["退款什么时候到账", "hello", "can i change the shipping address on my order", "讲个笑话"]
    batch = classifier.classify(texts)
    alone = [classifier.classify([t])[0] for t in texts]
    assert [d.label for d in batch] == [d.label for d in alone]
    assert [d.language for d in batch] == ["zh", "en", "en", "zh"]
    for d in batch:
        assert d.label in LABELS and 0.0 < d.confidence <= 1.0
        assert d.stage in {"ngram", "encoder"}
        assert d.model_version.startswith("intent-")
    assert classifier.classify([]) == []


def test_policy_routes_stages(classifier: IntentClassifier) -> None:
    texts = ["在吗", "where is my refund", "我的快递怎么还没到"]
    always = load_intent_classifier(MODELS_DIR, encoder=classifier._encoder, policy=CascadePolicy(1.01))
    never = load_intent_classifier(MODELS_DIR, encoder=classifier._encoder, policy=CascadePolicy(0.0))
    assert {d.stage for d in always.classify(texts)} == {"encoder"}
    assert {d.stage for d in never.classify(texts)} == {"ngram"}


def test_odd_inputs_do_not_fail(classifier: IntentClassifier) -> None:
    decisions = classifier.classify(["", "   ", "😡😡😡", "x" * 5000, "订单" * 1000])
    assert len(decisions) == 5 and all(d.label in LABELS for d in decisions)


def test_traditional_chinese_gets_the_intent_of_its_simplified_form(classifier: IntentClassifier) -> None:
    """The char n-gram stage and the encoder see traditional characters as simplified."""
    import opencc

    s2t = opencc.OpenCC("s2t")
    texts = [
        "退货要在几天内申请",
        "我的包裹显示已签收但我没收到",
        "密码忘记了怎么重设",
        "发票抬头写错了 要重开",
    ]
    traditional = [s2t.convert(t) for t in texts]
    assert traditional != texts
    want = [(d.label, round(float(d.confidence), 5)) for d in classifier.classify(texts)]
    got = [(d.label, round(float(d.confidence), 5)) for d in classifier.classify(traditional)]
    assert got == want
