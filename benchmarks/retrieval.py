"""Knowledge retrieval on the held-out questions: top-1, MRR@10, recall@5, the relevance threshold,
and search latency at the demo size and at ~1000 chunks.

    .venv/bin/python benchmarks/retrieval.py                 # hybrid (needs var/models, built if missing)
    .venv/bin/python benchmarks/retrieval.py --keyword-only  # BM25 + reranker, no encoder
    .venv/bin/python benchmarks/retrieval.py --intent        # pass each question's gold intent too
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.knowledge import Document, KnowledgeIndex, SentenceEncoder, load_demo_documents
from streams.knowledge._data import Question, load_questions

MODELS_DIR = Path(__file__).resolve().parents[1] / "var" / "models"


def load_encoder(models_dir: Path, build: bool) -> SentenceEncoder:
    from streams.assistant.encoder import load_encoder as load

    if build:
        from streams.assistant.intent._build import build_models

        build_models(models_dir)
    return load(models_dir)


def evaluate(index: KnowledgeIndex, questions: list[Question], use_intent: bool) -> None:
    documents = {d.document_id: d for d in index.documents()}
    groups: dict[str, list[tuple[int | None, bool]]] = {"all": [], "zh": [], "en": [], "cross-language": []}
    out_of_scope: list[bool] = []  # judged relevant?
    in_scope_relevant: list[bool] = []
    misses = []
    for q in questions:
        hits = index.search(q.text, 10, intent=q.intent if use_intent else None)
        top_relevant = bool(hits) and hits[0].relevant
        if q.document_id is None:
            out_of_scope.append(top_relevant)
            if top_relevant:
                misses.append(f"  out-of-scope judged relevant: {q.text!r} -> {hits[0].document_id}")
            continue
        ids = [h.document_id for h in hits]
        rank = ids.index(q.document_id) if q.document_id in ids else None
        correct_relevant = rank == 0 and top_relevant
        in_scope_relevant.append(top_relevant)
        cross = documents[q.document_id].language != q.language
        for name in ("all", q.language, "cross-language") if cross else ("all", q.language):
            groups[name].append((rank, correct_relevant))
        if rank != 0:
            got = f"{ids[0]} ({hits[0].scores.rerank:.2f})" if ids else "nothing"
            misses.append(f"  {q.text!r}: want {q.document_id} at rank {rank}, got {got}")

    print(f"{'questions':16} {'n':>4} {'top-1':>6} {'MRR@10':>7} {'R@5':>6} {'top-1 & relevant':>17}")
    for name, rows in groups.items():
        if not rows:
            continue
        n = len(rows)
        top1 = sum(r == 0 for r, _ in rows) / n
        mrr = sum(1.0 / (r + 1) for r, _ in rows if r is not None) / n
        r5 = sum(r is not None and r < 5 for r, _ in rows) / n
        answered = sum(ok for _, ok in rows) / n
        print(f"{name:16} {n:4d} {top1:6.3f} {mrr:7.3f} {r5:6.3f} {answered:17.3f}")

    rejected = sum(not r for r in out_of_scope)
    false_rejects = sum(not r for r in in_scope_relevant)
    precision = rejected / (rejected + false_rejects) if rejected + false_rejects else 0.0
    recall = rejected / len(out_of_scope) if out_of_scope else 0.0
    print(
        f"\n'nothing relevant' on {len(out_of_scope)} out-of-scope questions: precision {precision:.3f}, "
        f"recall {recall:.3f} ({rejected} rejected; {false_rejects} of {len(in_scope_relevant)} "
        f"answerable questions wrongly rejected; threshold {index.reranker.threshold:.3f})"
    )
    if misses:
        print("\nmisses:")
        print("\n".join(misses))


def filler_documents(base: list[Document], n: int, seed: int = 7) -> list[Document]:
    """Synthetic articles recombined from the FAQ's sentences, to measure latency at a larger size."""
    rng = random.Random(seed)
    sentences = [s for d in base for s in d.body.replace("\n", " ").split(". ") if len(s) > 20]
    return [
        Document(
            document_id=f"filler-{i}",
            title=f"{rng.choice(base).title} ({i})",
            body="\n\n".join(". ".join(rng.sample(sentences, 3)) for _ in range(rng.randint(1, 3))),
            tags=("filler",),
        )
        for i in range(n)
    ]


def latency(index: KnowledgeIndex, questions: list[Question], label: str) -> None:
    texts = [q.text for q in questions]
    for text in texts[:20]:
        index.search(text, 5)  # warm up
    timings = []
    for _ in range(3):
        for text in texts:
            start = time.perf_counter()
            index.search(text, 5)
            timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    p50 = statistics.median(timings)
    p99 = timings[int(len(timings) * 0.99) - 1]
    print(
        f"search latency, {label} ({len(index)} documents, {index.chunk_count} chunks): "
        f"p50 {p50:.2f} ms, p99 {p99:.2f} ms over {len(timings)} searches"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--keyword-only", action="store_true", help="no sentence encoder")
    parser.add_argument("--no-build", action="store_true", help="do not run build_models first")
    parser.add_argument("--intent", action="store_true", help="pass the gold intent to search")
    parser.add_argument("--questions", default="heldout_questions.jsonl")
    args = parser.parse_args()

    encoder = None if args.keyword_only else load_encoder(args.models_dir, build=not args.no_build)
    documents = load_demo_documents()
    index = KnowledgeIndex(encoder)
    start = time.perf_counter()
    index.upsert_many(documents)
    build_ms = (time.perf_counter() - start) * 1000
    questions = load_questions(args.questions)
    mode = "keyword only" if encoder is None else "hybrid"
    print(
        f"{args.questions}: {len(questions)} questions, {len(documents)} documents ({mode}, "
        f"reranker {index.reranker.version}, intent {'given' if args.intent else 'not given'})\n"
    )
    evaluate(index, questions, args.intent)
    print(f"\nindexing the demo FAQ: {build_ms:.0f} ms")
    latency(index, questions, "demo FAQ")
    index.upsert_many(filler_documents(documents, 700))
    latency(index, questions, "demo FAQ + filler")


if __name__ == "__main__":
    main()
