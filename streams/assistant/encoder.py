"""Multilingual sentence encoder (Google USE v3, 512-d) on onnxruntime and `tokenizers`.

The artifacts come from `switchboard models build` (see `streams.assistant.intent.build_models`):
`<models_dir>/sentence_encoder.onnx` and `<models_dir>/sentence_encoder.tokenizer.json`.
Inference is synchronous and CPU-bound; callers on an event loop run it in an executor.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ENCODER_FILE = "sentence_encoder.onnx"
TOKENIZER_FILE = "sentence_encoder.tokenizer.json"
EMBEDDING_DIM = 512

_UNK, _BOS, _EOS = 0, 1, 2
# Widest n-gram window of the model: two tokens of left context, two of right (orders 2, 3, 5).
_WINDOW_OFFSETS = np.arange(-2, 4, dtype=np.int64)
# Tokens per ONNX call: large enough to amortise the weight reads, small enough to stay in cache
# (a sentence longer than this is a batch of its own).
_TOKEN_BUDGET = 1024
# Far longer than any chat message (ingress caps message size); bounds the cost of a pasted
# document. Texts under it embed exactly as in the original model.
_MAX_TOKENS_PER_TEXT = 2048


def session_options() -> ort.SessionOptions:
    """One thread per session: on a shared 2-core box, parallelism comes from batching."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class SentenceEncoder:
    """Texts to L2-normalised 512-d float32 vectors (multilingual, zh and en in one space)."""

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer) -> None:
        self._session = session
        self._tokenizer = tokenizer
        # tokenizers releases the GIL and may be called from several threads; ORT runs are
        # thread-safe too, but one run at a time keeps the single intra-op thread honest.
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return EMBEDDING_DIM

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with <s> and </s>, exactly as the original SentencePiece model produces them."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        out = []
        for enc in encodings:
            ids = enc.ids
            if len(ids) <= 2:  # empty after normalisation: SentencePiece yields a single <unk>
                ids = [_BOS, _UNK, _EOS]
            elif len(ids) > _MAX_TOKENS_PER_TEXT:
                ids = [*ids[: _MAX_TOKENS_PER_TEXT - 1], _EOS]
            out.append(ids)
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` into an (n, 512) float32 array of unit vectors."""
        n = len(texts)
        out = np.empty((n, EMBEDDING_DIM), dtype=np.float32)
        if n == 0:
            return out
        all_ids = self.token_ids(texts)
        first, budget = 0, 0
        for i, ids in enumerate(all_ids):
            if i > first and budget + len(ids) > _TOKEN_BUDGET:
                out[first:i] = self._run(all_ids[first:i])
                first, budget = i, 0
            budget += len(ids)
        out[first:] = self._run(all_ids[first:])
        return out

    def _run(self, group: list[list[int]]) -> np.ndarray:
        feeds = flat_batch(group)
        with self._lock:
            (embeddings,) = self._session.run(["embeddings"], feeds)
        return np.asarray(embeddings, dtype=np.float32)


def flat_batch(group: list[list[int]]) -> dict[str, np.ndarray]:
    """The encoder graph's inputs for a group of token-id lists (all tokens in one flat batch).

    `window[t]` holds the positions t-2 .. t+3, with any slot outside t's own sentence pointing at
    row `n_tokens`, which the graph fills with zeros: the per-sentence zero padding of the model.
    """
    lens = np.fromiter(map(len, group), dtype=np.int64, count=len(group))
    n_tokens = int(lens.sum())
    flat = np.fromiter(chain.from_iterable(group), dtype=np.int64, count=n_tokens)
    starts = np.zeros(len(group), dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    token_sentence = np.repeat(np.arange(len(group), dtype=np.int64), lens)
    base = np.arange(n_tokens, dtype=np.int64)[:, None] + _WINDOW_OFFSETS
    inside = (base >= starts[token_sentence][:, None]) & (base < (starts + lens)[token_sentence][:, None])
    return {
        "input_ids": flat,
        "window": np.where(inside, base, n_tokens),
        "token_sentence": token_sentence,
        "sentence_lengths": lens.astype(np.float32),
    }


def load_encoder(models_dir: Path) -> SentenceEncoder:
    """Load the encoder built under `models_dir` (run `switchboard models build` first)."""
    model_path = Path(models_dir) / ENCODER_FILE
    tokenizer_path = Path(models_dir) / TOKENIZER_FILE
    missing = [str(p) for p in (model_path, tokenizer_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"sentence encoder artifacts missing: {', '.join(missing)}; run `switchboard models build`"
        )
    session = ort.InferenceSession(
        str(model_path), sess_options=session_options(), providers=["CPUExecutionProvider"]
    )
    return SentenceEncoder(session, Tokenizer.from_file(str(tokenizer_path)))


__all__ = ["EMBEDDING_DIM", "SentenceEncoder", "load_encoder", "session_options"]
