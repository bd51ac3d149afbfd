"""The needs-person probe (streams/assistant/needs_person.py) and its place in decide_handoff.

The probe's messages here are in no question set and use none of the rules' phrases: with an unsure
intent no rule hands them off (asserted). (With the real classifier the first two read as confident
complaints and the complaint rule takes them; tests/integration/test_assistant.py has one only the
probe hands off.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.assistant.handoff import REASON_NEEDS_PERSON, IntentDecision, decide_handoff
from streams.assistant.needs_person import NeedsPersonProbe, load_probe
from streams.knowledge import SentenceEncoder
from streams.knowledge._text import to_simplified

MODELS_DIR = Path(__file__).resolve().parents[2] / "var" / "models"
UNSURE = IntentDecision("out_of_scope", 0.9)

PERSON = [
    "I'd like this looked at by someone with the authority to fix it",
    "这个问题你解决不了 让能拍板的人来处理",
    "please pass this on to a colleague who knows what they're doing",
    "你们这边能不能安排个懂的同事跟进一下",
]
ORDINARY = ["how long does shipping take to Canada", "我想退货 怎么操作", "where is my order", "优惠券怎么用"]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    from streams.assistant.encoder import load_encoder
    from streams.assistant.intent import build_models

    build_models(MODELS_DIR)  # fast when the artifacts are current
    return load_encoder(MODELS_DIR)


@pytest.fixture(scope="module")
def probe() -> NeedsPersonProbe:
    return load_probe()


def _says(probe: NeedsPersonProbe, encoder: SentenceEncoder, text: str) -> str | None:
    (verdict,) = probe.verdicts(encoder.encode([to_simplified(text)]))
    return verdict


@pytest.mark.parametrize("text", PERSON)
def test_a_request_for_a_person_worded_past_the_rules_is_handed_off(
    text: str, probe: NeedsPersonProbe, encoder: SentenceEncoder
) -> None:
    assert decide_handoff(text=text, intent=UNSURE, answered=False) is None, "a rule already hands it off"
    handoff = decide_handoff(
        text=text, intent=UNSURE, answered=False, needs_person=_says(probe, encoder, text)
    )
    assert handoff is not None and handoff.reason == REASON_NEEDS_PERSON, text


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_questions_are_not_read_as_needing_a_person(
    text: str, probe: NeedsPersonProbe, encoder: SentenceEncoder
) -> None:
    assert _says(probe, encoder, text) is None, text


def test_a_question_the_faq_answers_is_answered_whatever_the_probe_says() -> None:
    handoff = decide_handoff(
        text="你们人工客服几点下班", intent=UNSURE, answered=True, needs_person="probe 0.95"
    )
    assert handoff is None


REFUSALS = [
    "不要转人工 我自己看",
    "I don't want to talk to anyone, just tell me the return window",
    # A review's paraphrases (twenty-eighth session), past `declines_human`'s phrases: the probe
    # handed 11 of 28 such off before the negation guard.
    "I don't want to speak to a manager, where is my parcel",
    "please don't hand me over",
    "不要转给别人",
    "不用找别人 你回答就行",
    "forget the agent, just tell me the refund policy",
    "I'd prefer you handle it rather than a person",
    "don't escalate this",
    "不用麻烦同事了",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_a_message_refusing_a_person_is_not_handed_off_by_the_probe(text: str) -> None:
    # Whatever the probe says: it reads most of these as wanting a person (0.87-0.99).
    assert decide_handoff(text=text, intent=UNSURE, answered=False, needs_person="probe 0.95") is None


@pytest.mark.parametrize(
    "text",
    [
        "no one is helping me, get me someone who can actually fix this",
        "I never placed these orders, someone is using my account",
        "不是我下的单 有人盗了我的号",
        "不要再敷衍我了 让能拍板的来",
        "honestly i can't cope anymore and i don't want to be here",
    ],
)
def test_a_negation_elsewhere_leaves_the_probes_hand_off_standing(text: str) -> None:
    handoff = decide_handoff(text=text, intent=UNSURE, answered=False, needs_person="probe 0.95")
    assert handoff is not None, text


def test_the_weights_match_the_encoder(probe: NeedsPersonProbe, encoder: SentenceEncoder) -> None:
    assert probe.coef.shape == (encoder.encode(["x"]).shape[1],)
    with pytest.raises(ValueError, match="dims"):
        probe.probabilities(np.zeros((1, 3), dtype=np.float32))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"coef": [0.1] * 3}, "512 finite"),
        ({"coef": [float("nan")] * 512}, "512 finite"),
        ({"threshold": 0}, "threshold"),
    ],
)
def test_weights_that_are_not_the_trainers_are_refused_at_load(
    tmp_path: Path, change: dict, match: str
) -> None:
    import json

    from streams.assistant.needs_person import WEIGHTS_FILE

    data = json.loads(WEIGHTS_FILE.read_text(encoding="utf-8")) | change
    bad = tmp_path / "weights.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_probe(bad)
