"""Answers to the bot's "did you mean …?" (streams/assistant/followup.py)."""

from __future__ import annotations

import pytest

from streams.assistant.followup import accepted_offer


@pytest.mark.parametrize(
    ("text", "offered", "taken"),
    [
        ("yes", 1, 0),
        ("Yes!", 2, 0),  # a bare yes to two titles: the first, the closer one
        ("yes please", 1, 0),
        ("yep, that's it", 1, 0),
        ("ＹＥＳ", 1, 0),  # full-width
        ("👍", 1, 0),
        ("yes 🙂", 1, 0),
        ("the second one", 2, 1),
        ("yes the first one thanks", 2, 0),
        ("last one", 2, 1),
        ("2", 2, 1),
        ("是的", 1, 0),
        ("嗯", 1, 0),
        ("对对对", 1, 0),
        ("嗯嗯 第二个", 2, 1),
        ("对，第一个", 2, 0),
        ("第二个吧", 2, 1),
        ("是的，谢谢", 1, 0),
        # A review's misses: traditional Chinese, digits after 第, other ways to say 2, a correction.
        ("對", 1, 0),
        ("沒錯", 1, 0),
        ("第2个", 2, 1),
        ("第１个", 2, 0),
        ("option 2", 2, 1),
        ("2️⃣", 2, 1),
        ("yes\u200b", 1, 0),
        ("对，就是第二个", 2, 1),
        ("不是第一个，是第二个", 2, 1),
        ("no, the second one", 2, 1),
        ("是的是的是的", 1, 0),
    ],
)
def test_a_reply_to_the_offer_takes_the_title_it_names(text: str, offered: int, taken: int) -> None:
    assert accepted_offer(text, offered) == taken


@pytest.mark.parametrize(
    ("text", "offered"),
    [
        ("the second one", 1),  # only one title was offered
        ("yes", 0),  # nothing was offered
        ("no", 1),
        ("不是", 1),
        ("ok", 1),  # an acknowledgement, or a yes to the person offered: not a choice
        ("好的", 1),
        ("yes connect me to a person", 1),
        ("yes, how long does it take", 1),  # a question of its own
        ("what about refunds?", 1),
        ("", 1),
        ("yes " * 20, 1),
        # Questions and hesitation are not answers.
        ("嗯？", 1),
        ("yes?", 1),
        ("right?", 1),
        ("嗯...", 1),
        ("Right...", 1),
    ],
)
def test_anything_else_is_not_an_answer_to_the_offer(text: str, offered: int) -> None:
    assert accepted_offer(text, offered) is None
