"""Building the avatar's part of the vector index (what index jobs do, `trainer.jobs.index`):
its context documents chunked, embedded and written to the user's vector store
(`trainer.rag.store`), incrementally.

    list vectorstore_data/ (names + ETags) -> compare with the chunks the store holds
    -> download + parse + chunk only new and changed documents -> embed in batches
    -> one commit: add their chunks, drop chunks of changed and deleted documents
    -> the avatar's index_meta row (model, chunking, counts) -> the job's `result`

A document is kept when the store holds its chunks for exactly its current ETag, cut with the
current chunking, by the current embedding model. `full: true`, a changed chunking or a
changed `EMBEDDING_MODEL` re-embeds everything. The store, not a side file, is the truth about
what is indexed, so a retry after a crash at any point converges on the same index.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from contracts.context_documents import (
    ContextRecord,
    DocumentError,
    parse_context_document,
    validate_context_document_name,
)
from contracts.ids import InvalidIdentifier
from contracts.jobs import JobProgress
from contracts.keys import context_data_prefix, document_name_from_key, vectorstore_prefix
from trainer.errors import JobFailure
from trainer.rag.chunking import chunk_text
from trainer.rag.embeddings import Embedder, get_embedder
from trainer.rag.store import IndexInfo, VectorStore, chunks_schema, metadata_tokens, now_iso
from trainer.s3_objects import S3Objects

log = logging.getLogger("avatune.trainer")


@dataclass(frozen=True)
class ListedDocument:
    name: str
    key: str
    etag: str
    size: int = 0


@dataclass
class PreparedChunk:
    source: str
    etag: str
    record: ContextRecord
    number: int  # position of the chunk in its document
    text: str
    start: int
    end: int


def list_documents(s3: Any, bucket: str, user_id: str, avatar_id: str) -> list[ListedDocument]:
    """The avatar's context documents with a valid name, sorted by name."""
    prefix = context_data_prefix(user_id, avatar_id)
    docs: list[ListedDocument] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = document_name_from_key(obj["Key"], prefix)
            if name is None:
                continue
            try:
                validate_context_document_name(name)
            except InvalidIdentifier:
                continue
            docs.append(ListedDocument(name, obj["Key"], obj["ETag"].strip('"'), int(obj.get("Size") or 0)))
    return sorted(docs, key=lambda d: d.name)


def download(s3: Any, bucket: str, doc: ListedDocument) -> tuple[bytes, str] | None:
    """The document's bytes and the ETag of exactly those bytes; None if it was deleted meanwhile."""
    found = S3Objects(s3, bucket).read(doc.key)
    return None if found is None else (found[0], found[1].strip('"'))


def chunk_document(name: str, etag: str, data: bytes, chunk_size: int, chunk_overlap: int) -> list[PreparedChunk]:
    """The chunks of one document: each record (the whole text of .txt/.md, each line of
    .jsonl) is chunked on its own, so a chunk never mixes two records' metadata."""
    try:
        records = parse_context_document(name, data)
    except DocumentError as exc:
        raise JobFailure(f"context document {name!r} is invalid: {exc}") from None
    # .txt/.md: offsets into the document; .jsonl: into the record's (JSON-decoded) text, whose
    # line is recorded beside them.
    jsonl = name.lower().endswith(".jsonl")
    markdown = name.lower().endswith(".md")  # a heading starts a chunk
    chunks: list[PreparedChunk] = []
    for record in records:
        base = 0 if jsonl else record.start_offset
        for piece in chunk_text(record.text, chunk_size, chunk_overlap, markdown=markdown):
            chunks.append(
                PreparedChunk(name, etag, record, len(chunks), piece.text, base + piece.start, base + piece.end)
            )
    return chunks


def chunk_rows(
    chunks: list[PreparedChunk],
    vectors: Any,
    user_id: str,
    avatar_id: str,
    chunk_size: int,
    chunk_overlap: int,
    dimension: int,
) -> pa.Table:
    import json

    return pa.Table.from_pydict(
        {
            "chunk_id": [f"{avatar_id}:{c.source}:{c.etag}:{c.number}" for c in chunks],
            "user_id": [user_id] * len(chunks),
            "avatar_id": [avatar_id] * len(chunks),
            "source": [c.source for c in chunks],
            "etag": [c.etag for c in chunks],
            "record": [c.record.index for c in chunks],
            "line": [c.record.line for c in chunks],
            "start": [c.start for c in chunks],
            "end": [c.end for c in chunks],
            "text": [c.text for c in chunks],
            "metadata": [json.dumps(c.record.metadata, ensure_ascii=False, sort_keys=True) for c in chunks],
            "meta_kv": [metadata_tokens(c.record.metadata) for c in chunks],
            "chunk_size": [chunk_size] * len(chunks),
            "chunk_overlap": [chunk_overlap] * len(chunks),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dimension),
        },
        schema=chunks_schema(dimension),
    )


class Control(Protocol):
    """What indexing consults between batches: the job's `_Control` (or a benchmark's stand-in)."""

    def stop_reason(self) -> str | None: ...

    def report(self, progress: JobProgress) -> None: ...


class BuildStopped(Exception):
    """Indexing stopped between batches (cancel, SIGTERM, lost lease) before writing anything."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


def build_index(
    s3: Any,
    settings: Any,
    user_id: str,
    avatar_id: str,
    job_id: str,
    control: Control,
    *,
    chunk_size: int,
    chunk_overlap: int,
    full: bool = False,
) -> dict[str, Any]:
    """(Re)index the avatar's context documents (see the module doc); the job's `result`.
    Raises BuildStopped when `control` says stop before the store is written."""
    if chunk_overlap >= chunk_size:
        raise JobFailure(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})")
    started = time.monotonic()
    embedder = get_embedder(settings.embedding_model)
    store = VectorStore(settings, user_id)
    previous = store.index_info(avatar_id)
    table = store.chunks_table(embedder.name, embedder.dimension)
    held = store.documents(table, avatar_id)
    if previous is not None and previous.chunks_table != table.name:
        # A new embedding model: what the avatar had is in the old model's table (the
        # counts compare with it); anything of the avatar's in the new table is a stray.
        held = store.documents_in(previous.chunks_table, avatar_id)
    listed = list_documents(s3, settings.s3_bucket, user_id, avatar_id)

    full_reason = _full_reason(full, previous, embedder, chunk_size, chunk_overlap)
    current = (chunk_size, chunk_overlap)
    kept = [
        d
        for d in listed
        if full_reason is None
        and d.name in held
        and held[d.name].etags == {d.etag}
        and held[d.name].chunkings == {current}
    ]
    kept_names = {d.name for d in kept}
    to_embed = [d for d in listed if d.name not in kept_names]

    chunks, vanished = _prepare(s3, settings, to_embed, chunk_size, chunk_overlap)
    control.report(JobProgress(step=0, total_steps=len(chunks)))
    embed_started = time.monotonic()
    vectors = _embed(embedder, chunks, control, settings.embedding_batch_size)
    embed_seconds = time.monotonic() - embed_started

    listed_names = {d.name for d in listed} - vanished
    embedded_names = {d.name for d in to_embed} - vanished
    removed = sorted(set(held) - listed_names)
    changed = sorted(n for n in embedded_names if n in held)
    added = sorted(n for n in embedded_names if n not in held)
    drop = None if full_reason is not None else sorted(set(removed) | set(changed))
    rows = chunk_rows(chunks, vectors, user_id, avatar_id, chunk_size, chunk_overlap, embedder.dimension)
    if reason := control.stop_reason():
        raise BuildStopped(reason)
    store.replace(table, avatar_id, rows, drop)
    if previous is not None and previous.chunks_table != table.name:
        store.drop_avatar(previous.chunks_table, avatar_id)  # its index moved to the new model's table
    chunks_kept = sum(held[n].chunks for n in kept_names)
    chunks_removed = sum(s.chunks for n, s in held.items() if n not in kept_names)
    documents = len(kept) + len(embedded_names)
    store.write_index_info(
        IndexInfo(
            avatar_id=avatar_id,
            user_id=user_id,
            embedding_model=embedder.name,
            dimension=embedder.dimension,
            chunks_table=table.name,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            documents=documents,
            chunks=chunks_kept + len(chunks),
            job_id=job_id,
            updated_at=now_iso(),
        )
    )
    store.compact(table)
    seconds = time.monotonic() - started
    return {
        "embedding_model": embedder.name,
        "dimension": embedder.dimension,
        "vectorstore_prefix": vectorstore_prefix(user_id),
        "chunks_table": table.name,
        "chunk_size": chunk_size,
        "chunk_overlap": chunk_overlap,
        "full": full_reason is not None,
        "full_reason": full_reason,
        "documents": documents,
        "documents_added": len(added),
        "documents_changed": len(changed),
        "documents_removed": len(removed),
        "documents_kept": len(kept),
        "added": added,
        "changed": changed,
        "removed": removed,
        "chunks": chunks_kept + len(chunks),
        "chunks_added": len(chunks),
        "chunks_removed": chunks_removed,
        "chunks_kept": chunks_kept,
        "seconds": round(seconds, 3),
        "embed_seconds": round(embed_seconds, 3),
        "chunks_per_second": round(len(chunks) / seconds, 1) if chunks and seconds > 0 else None,
    }


def _prepare(
    s3: Any, settings: Any, docs: list[ListedDocument], chunk_size: int, chunk_overlap: int
) -> tuple[list[PreparedChunk], set[str]]:
    """Download (concurrently), parse and chunk `docs`; also the names that vanished meanwhile.
    A document over MAX_DOCUMENT_BYTES fails the job by name before anything is downloaded."""
    for doc in docs:
        if doc.size > settings.max_document_bytes:
            raise JobFailure(
                f"context document {doc.name!r} is {doc.size} bytes; a worker reads at most "
                f"{settings.max_document_bytes} (MAX_DOCUMENT_BYTES)"
            )
    with ThreadPoolExecutor(settings.download_concurrency) as pool:
        payloads = list(pool.map(lambda d: download(s3, settings.s3_bucket, d), docs))
    chunks: list[PreparedChunk] = []
    vanished: set[str] = set()
    for doc, payload in zip(docs, payloads):
        if payload is None:
            vanished.add(doc.name)
            continue
        data, etag = payload
        chunks.extend(chunk_document(doc.name, etag, data, chunk_size, chunk_overlap))
    return chunks, vanished


def _embed(embedder: Embedder, chunks: list[PreparedChunk], control: Control, batch: int) -> Any:
    """Vectors of all chunks, a batch at a time so progress shows and a cancel or SIGTERM
    stops the job between batches."""
    import numpy as np

    parts = [embedder.embed([])]
    for i in range(0, len(chunks), batch):
        if reason := control.stop_reason():
            raise BuildStopped(reason)
        parts.append(embedder.embed([c.text for c in chunks[i : i + batch]], batch_size=batch))
        control.report(JobProgress(step=min(i + batch, len(chunks)), total_steps=len(chunks)))
    return np.concatenate(parts)


def _full_reason(
    full: bool, previous: IndexInfo | None, embedder: Embedder, chunk_size: int, chunk_overlap: int
) -> str | None:
    """Why every document is embedded again, or None for an incremental run."""
    if full:
        return "requested"
    if previous is None:
        return None  # a first index: everything is new anyway (stray chunks of a crashed run are compared as usual)
    if previous.embedding_model != embedder.name or previous.dimension != embedder.dimension:
        return f"embedding model changed from {previous.embedding_model!r} to {embedder.name!r}"
    if (previous.chunk_size, previous.chunk_overlap) != (chunk_size, chunk_overlap):
        return (
            f"chunking changed from {previous.chunk_size}/{previous.chunk_overlap} "
            f"to {chunk_size}/{chunk_overlap} (chunk_size/chunk_overlap)"
        )
    return None


__all__ = ["BuildStopped", "build_index", "chunk_document", "chunk_rows", "list_documents"]
