"""The knowledge base: documents as events, chunked and indexed for hybrid retrieval."""
