"""The user's vector store: LanceDB tables under `s3://{S3_BUCKET}/users/{user_id}/vectorstore/`.

LanceDB writes straight to S3 (no local copy to sync) and commits each write as a new table
version with a conditional PUT, so concurrent index jobs of a user's avatars do not lose each
other's writes. Two kinds of table:

- `index_meta`: one row per avatar: which embedding model (and dimension) built the avatar's
  index, in which chunks table, with which chunking, when, by which job. Readers (retrieve
  jobs, RAG generation, an inference endpoint) start here.
- `chunks-{dimension}d-{model hash}`: one table per embedding model (vectors of different
  models cannot share a column). Each row is one chunk: user, avatar, source document name,
  its ETag, record/line, start/end offsets, text, metadata (JSON, plus `meta_kv`: one
  `key=<json value>` token per item, so equality filters run inside the store as
  `array_has_all`), the chunking it was cut with, and its unit-length vector.

Every query filters on `avatar_id` (and the request's metadata filters) *inside* the vector
search (`prefilter`), so an avatar's query never ranks, let alone returns, another avatar's
chunks; other users' chunks live under another prefix altogether.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from contracts.context_documents import validate_metadata_key
from contracts.keys import vectorstore_prefix
from trainer.errors import JobFailure

log = logging.getLogger("avatune.trainer")

META_TABLE = "index_meta"
MetadataValue = str | int | float | bool

META_SCHEMA = pa.schema(
    [
        pa.field("avatar_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("embedding_model", pa.string(), nullable=False),
        pa.field("dimension", pa.int32(), nullable=False),
        pa.field("chunks_table", pa.string(), nullable=False),
        pa.field("chunk_size", pa.int32(), nullable=False),
        pa.field("chunk_overlap", pa.int32(), nullable=False),
        pa.field("documents", pa.int64(), nullable=False),
        pa.field("chunks", pa.int64(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("updated_at", pa.string(), nullable=False),
    ]
)


def chunks_schema(dimension: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("avatar_id", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
            pa.field("etag", pa.string(), nullable=False),
            pa.field("record", pa.int32(), nullable=False),
            pa.field("line", pa.int32(), nullable=False),
            pa.field("start", pa.int64(), nullable=False),
            pa.field("end", pa.int64(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("metadata", pa.string(), nullable=False),
            pa.field("meta_kv", pa.list_(pa.string()), nullable=False),
            pa.field("chunk_size", pa.int32(), nullable=False),
            pa.field("chunk_overlap", pa.int32(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimension), nullable=False),
        ]
    )


# Columns a search returns (never the vector).
RESULT_COLUMNS = ["chunk_id", "source", "etag", "record", "line", "start", "end", "text", "metadata"]


class NoIndex(JobFailure):
    """The avatar has no vector index yet."""


class EmbeddingModelMismatch(JobFailure):
    """The avatar's index was built with another embedding model than this worker's."""


@dataclass(frozen=True)
class IndexInfo:
    """The avatar's row of `index_meta`."""

    avatar_id: str
    user_id: str
    embedding_model: str
    dimension: int
    chunks_table: str
    chunk_size: int
    chunk_overlap: int
    documents: int
    chunks: int
    job_id: str
    updated_at: str


@dataclass
class DocumentState:
    """What the chunks table holds for one source document of an avatar."""

    etags: set[str]
    chunks: int
    chunkings: set[tuple[int, int]]


def chunks_table_name(model: str, dimension: int) -> str:
    return f"chunks-{dimension}d-{hashlib.sha256(model.encode()).hexdigest()[:12]}"


def sql_string(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def _normalised(value: MetadataValue) -> MetadataValue:
    """One spelling per value: 3 and 3.0 are the same number; True stays a bool."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def metadata_token(key: str, value: MetadataValue) -> str:
    """The `meta_kv` token of a metadata item (and of an equality filter on it)."""
    return f"{key}={json.dumps(_normalised(value), ensure_ascii=False)}"


def metadata_tokens(metadata: dict[str, MetadataValue]) -> list[str]:
    return sorted(metadata_token(k, v) for k, v in metadata.items())


def where_clause(avatar_id: str, filters: dict[str, MetadataValue] | None) -> str:
    """The prefilter of an avatar's query: its own chunks whose metadata holds every filter item."""
    clause = f"avatar_id = {sql_string(avatar_id)}"
    if filters:
        tokens = []
        for key, value in sorted(filters.items()):
            try:
                validate_metadata_key(key)
            except ValueError as exc:
                raise JobFailure(f"filters: {exc}") from None
            if isinstance(value, float) and value != value:
                raise JobFailure(f"filters.{key}: NaN never matches")
            tokens.append(sql_string(metadata_token(key, value)))
        clause += f" AND array_has_all(meta_kv, [{', '.join(tokens)}])"
    return clause


def storage_options(settings: Any) -> dict[str, str]:
    """object_store options from the worker's settings. Credentials come from the standard AWS
    chain (environment, web identity, instance/task role), never from here."""
    options = {"region": settings.region}
    if settings.aws_endpoint_url:
        options["endpoint"] = settings.aws_endpoint_url
        options["allow_http"] = str(settings.aws_endpoint_url.startswith("http://")).lower()
    return options


def store_uri(bucket: str, user_id: str) -> str:
    return f"s3://{bucket}/{vectorstore_prefix(user_id)}"


class VectorStore:
    """One user's vector store (see the module doc)."""

    def __init__(self, settings: Any, user_id: str) -> None:
        import lancedb

        self.user_id = user_id
        self.uri = store_uri(settings.s3_bucket, user_id)
        self._db = lancedb.connect(self.uri, storage_options=storage_options(settings))

    # -- tables -----------------------------------------------------------------------------

    def _open(self, name: str) -> Any | None:
        try:
            return self._db.open_table(name)
        except (FileNotFoundError, ValueError) as exc:  # lancedb: ValueError "Table ... was not found"
            if "not found" in str(exc).lower() or isinstance(exc, FileNotFoundError):
                return None
            raise

    def _open_or_create(self, name: str, schema: pa.Schema) -> Any:
        table = self._open(name)
        if table is None:
            # exist_ok: another job of the same user may create it at the same moment.
            table = self._db.create_table(name, schema=schema, exist_ok=True)
        return table

    def chunks_table(self, model: str, dimension: int) -> Any:
        return self._open_or_create(chunks_table_name(model, dimension), chunks_schema(dimension))

    # -- the avatar's index info -------------------------------------------------------------

    def index_info(self, avatar_id: str) -> IndexInfo | None:
        table = self._open(META_TABLE)
        if table is None:
            return None
        rows = table.search().where(f"avatar_id = {sql_string(avatar_id)}").limit(1).to_list()
        if not rows:
            return None
        return IndexInfo(**{f.name: rows[0][f.name] for f in META_SCHEMA})

    def write_index_info(self, info: IndexInfo) -> None:
        table = self._open_or_create(META_TABLE, META_SCHEMA)
        row = pa.Table.from_pylist([info.__dict__], schema=META_SCHEMA)
        table.merge_insert("avatar_id").when_matched_update_all().when_not_matched_insert_all().execute(row)

    def checked_info(self, avatar_id: str, model: str) -> IndexInfo:
        """The avatar's index info, refusing a missing index or one built with another model."""
        info = self.index_info(avatar_id)
        if info is None:
            raise NoIndex(
                f"avatar {avatar_id!r} has no vector index yet: add context documents and run an index job "
                f"(POST .../context/index)"
            )
        if info.embedding_model != model:
            raise EmbeddingModelMismatch(
                f"the index of avatar {avatar_id!r} was built with {info.embedding_model!r}, this worker embeds "
                f"with {model!r} (EMBEDDING_MODEL); re-index the avatar's context documents"
            )
        return info

    # -- chunks -----------------------------------------------------------------------------

    def documents(self, table: Any, avatar_id: str) -> dict[str, DocumentState]:
        """What `table` holds for the avatar, by source document."""
        rows = (
            table.search()
            .where(f"avatar_id = {sql_string(avatar_id)}")
            .select(["source", "etag", "chunk_size", "chunk_overlap"])
            .limit(None)
            .to_arrow()
        )
        states: dict[str, DocumentState] = {}
        for source, etag, size, overlap in zip(
            *(rows.column(c).to_pylist() for c in ("source", "etag", "chunk_size", "chunk_overlap"))
        ):
            state = states.setdefault(source, DocumentState(set(), 0, set()))
            state.etags.add(etag)
            state.chunks += 1
            state.chunkings.add((size, overlap))
        return states

    def documents_in(self, table_name: str, avatar_id: str) -> dict[str, DocumentState]:
        table = self._open(table_name)
        return {} if table is None else self.documents(table, avatar_id)

    def replace(self, table: Any, avatar_id: str, rows: pa.Table, drop_sources: list[str] | None) -> None:
        """In one commit: add `rows` and delete the avatar's other chunks of `drop_sources`
        (None: all of the avatar's other chunks). Readers see the old or the new index, never a mix;
        a retry after a crash converges (rows are keyed by chunk_id)."""
        merge = table.merge_insert("chunk_id").when_matched_update_all().when_not_matched_insert_all()
        scope = f"avatar_id = {sql_string(avatar_id)}"
        if drop_sources:
            scope += f" AND source IN ({', '.join(sql_string(s) for s in sorted(drop_sources))})"
        elif drop_sources is not None:  # nothing to drop
            if rows.num_rows == 0:
                return
            merge.execute(rows)
            return
        merge.when_not_matched_by_source_delete(scope).execute(rows)

    def drop_avatar(self, table_name: str, avatar_id: str) -> None:
        """Delete the avatar's chunks from `table_name` (its index moved to another model's table)."""
        table = self._open(table_name)
        if table is not None:
            table.delete(f"avatar_id = {sql_string(avatar_id)}")

    def compact(self, table: Any) -> None:
        """Merge small fragments and prune versions older than an hour (long enough for any
        reader still on an old version). Best effort: the index is complete without it."""
        from datetime import timedelta

        try:
            table.optimize(cleanup_older_than=timedelta(hours=1))
        except Exception:
            log.warning("vector store compaction failed (ignored)", exc_info=True)

    def search(
        self,
        info: IndexInfo,
        avatar_id: str,
        vector: Any,
        top_k: int,
        score_threshold: float | None,
        filters: dict[str, MetadataValue] | None,
    ) -> list[dict[str, Any]]:
        """The avatar's `top_k` nearest chunks to `vector` (cosine), best first."""
        table = self._open(info.chunks_table)
        if table is None:
            raise NoIndex(f"the vector index of avatar {avatar_id!r} is missing its chunks table; re-index")
        query = (
            table.search(vector, vector_column_name="vector")
            .distance_type("cosine")
            .where(where_clause(avatar_id, filters), prefilter=True)
            .select([*RESULT_COLUMNS, "_distance"])
            .limit(top_k)
        )
        if score_threshold is not None:  # score = 1 - cosine distance; bounded inside the search
            query = query.distance_range(upper_bound=1.0 - score_threshold + 1e-6)
        passages = []
        for row in query.to_list():
            score = 1.0 - float(row["_distance"])
            if score_threshold is not None and score < score_threshold:
                continue  # float rounding at the bound
            passages.append(
                {
                    "text": row["text"],
                    "score": round(score, 6),
                    "source": row["source"],
                    "chunk_id": row["chunk_id"],
                    "etag": row["etag"],
                    "start": row["start"],
                    "end": row["end"],
                    "line": row["line"],
                    "metadata": json.loads(row["metadata"]),
                }
            )
        return passages


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
