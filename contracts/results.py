"""What a finished generate, index or retrieve job leaves in its record's `result`, typed for
the API's view of a job (`handlers.job_views`) and its OpenAPI document.

On the wire `result` stays a JSON object (the record's schema says `object`, and the trainer's
recipes build it: `trainer/jobs/generate.py`, `trainer/rag/indexing.py`, `trainer/jobs/retrieve.py`).
These models name and document its fields; they keep fields a later trainer adds
(`extra="allow"`) and show a result exactly as it was stored (`AsReported`: a field the run
did not set is left out, never written as null).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class AsReported(BaseModel):
    """Serialised as it was read: the fields it was given (and unknown extra ones), no defaults."""

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _as_reported(self, handler: SerializerFunctionWrapHandler):  # no return type: the schema stays the model's
        data = handler(self)
        kept = self.model_fields_set | set(self.model_extra or {})
        return {k: v for k, v in data.items() if k in kept}


class Passage(AsReported):
    """One chunk of the avatar's vector index, best first."""

    text: str
    score: float | None = Field(default=None, description="cosine similarity of query and chunk, -1..1")
    source: str | None = Field(default=None, description="the context document's name")
    chunk_id: str | None = None
    etag: str | None = Field(default=None, description="the document version the chunk came from")
    start: int | None = Field(default=None, description="character offset into the document (.txt/.md) or record")
    end: int | None = None
    line: int | None = Field(default=None, description=".jsonl: the record's line")
    metadata: dict[str, Any] | None = None


class GenerationResult(AsReported):
    """A generate job's answer (`POST {base}/generations`)."""

    completion: str = Field(description="the generated text, new tokens only")
    adapter_version: int | None = Field(default=None, description="0: the base model alone")
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    max_new_tokens: int | None = Field(default=None, description="the cap used (MAX_GENERATION_TOKENS applied)")
    finish_reason: str | None = Field(default=None, description="stop: the model ended its turn; length: the cap")
    seconds: float | None = None
    prompt: str | None = Field(default=None, description="the exact rendered prompt, passages included")
    base_model: str | None = None
    passages: list[Passage] | None = Field(default=None, description="with `rag`: the passages put into the prompt")


class RetrievalResult(AsReported):
    """A retrieve job's answer (`POST {base}/retrievals`)."""

    passages: list[Passage]
    seconds: float | None = None
    embedding_model: str | None = None


class IndexResult(AsReported):
    """An index job's counts (`POST {base}/context/index`)."""

    chunks: int = Field(description="chunks of the avatar in the index now")
    embedding_model: str | None = None
    dimension: int | None = None
    vectorstore_prefix: str | None = None
    chunks_table: str | None = None
    chunk_size: int | None = None
    chunk_overlap: int | None = None
    full: bool | None = Field(default=None, description="every document was embedded again")
    full_reason: str | None = None
    documents: int | None = None
    documents_added: int | None = None
    documents_changed: int | None = None
    documents_removed: int | None = None
    documents_kept: int | None = None
    added: list[str] | None = None
    changed: list[str] | None = None
    removed: list[str] | None = None
    chunks_added: int | None = None
    chunks_removed: int | None = None
    chunks_kept: int | None = None
    seconds: float | None = None
    embed_seconds: float | None = None
    chunks_per_second: float | None = None
