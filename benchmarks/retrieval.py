"""Knowledge retrieval on questions the reranker was not trained on: top-1, MRR@10, recall@5, how
often the top hit is answered right / wrong / rejected, out-of-scope questions answered, and search
latency at the demo size and at ~1700 chunks.

Two question sets: the shop FAQ's held-out questions and an independent telecom FAQ
(benchmarks/data/, a different shop and writing style, never used for training or tuning). Each is
run as asked, with the own-language answer left out (only the other-language twin answers:
cross-language), and with the answer left out entirely (out of scope, but the neighbours remain).

    .venv/bin/python benchmarks/retrieval.py                 # hybrid (needs var/models, built if missing)
    .venv/bin/python benchmarks/retrieval.py --keyword-only  # BM25 + reranker, no encoder
    .venv/bin/python benchmarks/retrieval.py --intent        # pass the shop questions' gold intent
    .venv/bin/python benchmarks/retrieval.py --misses        # list every miss
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
from streams.knowledge._data import Question, load_questions, questions_from_rows, read_jsonl
from streams.knowledge._eval import CachingEncoder, Metrics, cases, run_cases

MODELS_DIR = Path(__file__).resolve().parents[1] / "var" / "models"
DATA_DIR = Path(__file__).resolve().parent / "data"
SCENARIOS = ("asked", "twin removed", "answer removed")


def load_encoder(models_dir: Path, build: bool) -> SentenceEncoder:
    from streams.assistant.encoder import load_encoder as load

    if build:
        from streams.assistant.intent._build import build_models

        build_models(models_dir)
    return load(models_dir)


def evaluate(
    encoder: SentenceEncoder | None,
    documents: list[Document],
    questions: list[Question],
    use_intent: bool,
    show_misses: bool,
) -> dict[str, Metrics]:
    """Every scenario of a question set (see streams.knowledge._eval), with its tables."""
    cached = CachingEncoder(encoder) if encoder is not None else None
    all_cases = cases(documents, questions, SCENARIOS)
    hits = run_cases(
        documents,
        all_cases,
        lambda: KnowledgeIndex(cached),
        lambda index, case: index.search(
            case.question.text, 10, intent=case.question.intent if use_intent else None
        ),
    )
    metrics: dict[str, Metrics] = {s: Metrics() for s in SCENARIOS}
    for case, found in zip(all_cases, hits, strict=True):
        metrics[case.scenario].add(case, found)

    print(f"{'scenario / questions':30} {'n':>4} {'top-1':>6} {'MRR@10':>7} {'R@5':>6}")
    for scenario, m in metrics.items():
        for group in ("all", "zh", "en", "cross-language"):
            n = len(m.ranks.get(group, []))
            if n and not (scenario == "twin removed" and group == "cross-language"):
                label = f"{scenario}: {group}"
                print(f"{label:30} {n:4d} {m.top1(group):6.3f} {m.mrr(group):7.3f} {m.recall(group):6.3f}")
    print(
        f"\n{'answer or not (top hit)':30} {'answerable':>10} {'right':>6} {'wrong':>6} {'FN':>6} {'OOS':>5} {'FP':>6}"
    )
    for scenario, m in metrics.items():
        r = m.rates()
        print(
            f"{scenario:30} {m.answerable:10d} {r['right']:6.3f} {r['wrong_answer']:6.3f} "
            f"{r['false_negative']:6.3f} {m.out_of_scope:5d} {r['false_positive']:6.3f}"
        )
    if show_misses:
        for scenario, m in metrics.items():
            if m.misses:
                print(f"\nmisses ({scenario}):")
                print("\n".join(m.misses))
    return metrics


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
    parser.add_argument("--intent", action="store_true", help="pass the gold intent to search (shop set)")
    parser.add_argument("--misses", action="store_true", help="list every miss")
    args = parser.parse_args()

    encoder = None if args.keyword_only else load_encoder(args.models_dir, build=not args.no_build)
    mode = "keyword only" if encoder is None else "hybrid"
    reranker = KnowledgeIndex(encoder).reranker.version
    documents = load_demo_documents()
    sets = [
        (
            "shop FAQ, heldout_questions.jsonl",
            documents,
            load_questions("heldout_questions.jsonl"),
            args.intent,
        ),
        (
            "telecom FAQ (independent set, never tuned on)",
            [Document.from_dict(r) for r in read_jsonl(DATA_DIR / "telecom_faq.jsonl")],
            questions_from_rows(read_jsonl(DATA_DIR / "telecom_questions.jsonl")),
            False,
        ),
    ]
    for title, docs, questions, use_intent in sets:
        print(
            f"== {title}: {len(questions)} questions, {len(docs)} documents ({mode}, reranker {reranker}, "
            f"intent {'given' if use_intent else 'not given'})\n"
        )
        evaluate(encoder, docs, questions, use_intent, args.misses)
        print()

    index = KnowledgeIndex(encoder)
    start = time.perf_counter()
    index.upsert_many(documents)
    build_ms = (time.perf_counter() - start) * 1000
    questions = load_questions("heldout_questions.jsonl")
    print(f"indexing the demo FAQ: {build_ms:.0f} ms")
    latency(index, questions, "demo FAQ")
    index.upsert_many(filler_documents(documents, 700))
    latency(index, questions, "demo FAQ + filler")


if __name__ == "__main__":
    main()
