"""Review of 7464a07 (session 8): the negation that now overrides the talk_to_human intent.

`declines_human` takes "not" (or "don't", "do not") up to three words before the request as a
refusal of a person. Customers who ask for one with a "not" of their own a few words before it
("you are not helping me talk to an agent") were handed off on the intent until 7464a07; now
neither rule hands them off (the keyword rule already read them as declined).
"""

import pytest

from streams.assistant.handoff import IntentDecision, decide_handoff


@pytest.mark.parametrize(
    "text",
    [
        "you are not helping me talk to an agent",
        "I do not understand talk to a human",
        "why not talk to a human",
        "Is it not possible to talk to a person?",
    ],
)
def test_review_s8_a_request_after_an_unrelated_not_is_handed_off_on_the_intent(text: str) -> None:
    handoff = decide_handoff(text=text, intent=IntentDecision("talk_to_human", 0.9), answered=True)
    assert handoff is not None and handoff.reason == "customer_request", handoff
