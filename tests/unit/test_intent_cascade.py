"""Cascade decisions and text preparation: pure logic, no models."""

from __future__ import annotations

import numpy as np

from streams.assistant.intent import (
    CascadePolicy,
    decide_batch,
    detect_language,
    needs_encoder,
    normalize_text,
)


def proba(*rows: list[float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


def test_confident_ngram_messages_never_reach_the_encoder() -> None:
    p = proba([0.9, 0.1, 0.0], [0.4, 0.35, 0.25], [0.1, 0.2, 0.7])
    calls: list[list[int]] = []

    def encoder(idx: np.ndarray) -> np.ndarray:
        calls.append(idx.tolist())
        return np.tile(np.array([0.0, 1.0, 0.0], dtype=np.float32), (len(idx), 1))

    decisions = decide_batch(p, encoder, CascadePolicy(ngram_threshold=0.65, encoder_weight=0.5))
    assert calls == [[1]]  # one batched call, only for the unsure message
    assert [d.stage for d in decisions] == ["ngram", "encoder", "ngram"]
    assert [d.label_index for d in decisions] == [0, 1, 2]
    # Blended confidence: 0.5 * 1.0 + 0.5 * 0.35
    assert abs(decisions[1].confidence - 0.675) < 1e-6


def test_threshold_extremes() -> None:
    p = proba([0.99, 0.01], [0.5, 0.5])
    assert needs_encoder(p, CascadePolicy(1.01)).tolist() == [0, 1]
    assert needs_encoder(p, CascadePolicy(0.0)).tolist() == []
    assert needs_encoder(np.zeros((0, 2), dtype=np.float32), CascadePolicy(0.5)).tolist() == []


def test_encoder_weight_one_uses_encoder_alone() -> None:
    p = proba([0.6, 0.4])
    decisions = decide_batch(p, lambda idx: proba([0.2, 0.8]), CascadePolicy(0.9, encoder_weight=1.0))
    assert decisions[0].label_index == 1 and abs(decisions[0].confidence - 0.8) < 1e-6


def test_empty_batch() -> None:
    assert decide_batch(np.zeros((0, 16), dtype=np.float32), lambda idx: idx, CascadePolicy(0.5)) == []


def test_language_detection() -> None:
    assert detect_language("我的订单到哪了") == "zh"
    assert detect_language("tk 退款了吗") == "zh"
    assert detect_language("亲 refund 什么时候到") == "zh"
    assert detect_language("where is my order #A123") == "en"
    assert detect_language("ok thx 👍") == "en"
    assert detect_language("") == "en"


def test_normalize_text_folds_width_case_digits_and_spaces() -> None:
    assert normalize_text("  Ｈｅｌｌｏ  World 12345 ") == "_hello_world_00000_"
    assert normalize_text("退款\t吗") == "_退款_吗_"
