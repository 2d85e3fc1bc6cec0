"""`search()`: the avatar's best passages for a query, for retrieve jobs and RAG generation.

    from trainer.rag.search import search
    passages = search(settings, user_id, avatar_id, "question", top_k=5, score_threshold=0.3)
    # [{"text", "score", "source", "chunk_id", "etag", "start", "end", "line", "metadata"}, ...] best first

`score` is the cosine similarity of query and chunk (-1..1). `start`/`end` are character
offsets into the source document (`.txt`/`.md`) or into the text of the JSONL record on
`line` (`.jsonl`). Raises `trainer.rag.store.NoIndex` when the avatar has no index and
`trainer.rag.store.EmbeddingModelMismatch` when the index was built with another embedding
model than the worker's `EMBEDDING_MODEL`: both are `JobFailure`s, so a job that lets them
through fails with their message.
"""

from __future__ import annotations

from typing import Any

from trainer.rag.embeddings import canonical_name, get_embedder
from trainer.rag.store import MetadataValue, VectorStore
from trainer.settings import TrainerSettings


def search(
    settings: TrainerSettings,
    user_id: str,
    avatar_id: str,
    query: str,
    top_k: int = 5,
    score_threshold: float | None = None,
    filters: dict[str, MetadataValue] | None = None,
) -> list[dict[str, Any]]:
    """The `top_k` chunks of the avatar's index closest to `query` (cosine similarity as
    `score`, best first), at least `score_threshold` when given, whose metadata equals every
    `filters` item. The avatar and the filters are applied inside the store query."""
    store = VectorStore(settings, user_id)
    # Refuse a foreign-model index before loading (or downloading) the worker's model.
    info = store.checked_info(avatar_id, canonical_name(settings.embedding_model))
    embedder = get_embedder(settings.embedding_model)
    return store.search(info, avatar_id, embedder.embed_query(query), top_k, score_threshold, filters)
