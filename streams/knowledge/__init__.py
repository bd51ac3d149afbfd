"""The knowledge base: documents as events, chunked and indexed for hybrid retrieval.

`KnowledgeBase` holds one `KnowledgeIndex` per tenant. An index ranks documents for a question with
BM25 (Chinese as character unigrams + bigrams) and the sentence encoder's cosine, fuses both with
reciprocal-rank fusion and reranks with a small logistic regression whose calibrated threshold
marks each hit `relevant` or not.
"""

from streams.knowledge._data import load_demo_documents
from streams.knowledge._document import MAX_CHUNK_CHARS, Chunk, Document, chunk_document
from streams.knowledge._index import (
    Hit,
    KnowledgeBase,
    KnowledgeIndex,
    Scores,
    SentenceEncoder,
    default_reranker,
    rrf,
)
from streams.knowledge._rerank import FEATURES, Reranker
from streams.knowledge._text import detect_language, tokenize

__all__ = [
    "FEATURES",
    "MAX_CHUNK_CHARS",
    "Chunk",
    "Document",
    "Hit",
    "KnowledgeBase",
    "KnowledgeIndex",
    "Reranker",
    "Scores",
    "SentenceEncoder",
    "chunk_document",
    "default_reranker",
    "detect_language",
    "load_demo_documents",
    "rrf",
    "tokenize",
]
