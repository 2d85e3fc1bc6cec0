"""Benchmark 6: RAG indexing throughput and retrieval latency (CPU, the default embedding model).

Stack: moto in server mode (S3) <- this process running the index job's own code
(`trainer.rag.indexing.build_index`: list, download, parse, chunk, embed, one LanceDB commit
on S3, the index_meta row) and `trainer.rag.search.search` (the avatar's index info, query
embedding, LanceDB vector search with the avatar prefilter). The corpus is synthetic
English-like text, deterministic. Baselines in the same run:

- indexing: a full re-index of the same corpus (`full: true`) against an incremental
  re-index after editing a few documents; embedding in batches against one chunk at a time;
- retrieval: the query embedding alone (the floor of a retrieval), and a filtered query.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from typing import Any

from bench.common import PY, machine, ready_process, secs, table, today

BUCKET = "avatune-bench-rag"
USER, AVATAR = "bench-user", "bench-avatar"

_WORDS = (
    "river harbour lantern orchard council winter market engine garden library bridge mountain "
    "festival copper signal meadow quarry vessel archive tunnel glacier beacon workshop valley "
    "ferry tower cellar compass forest canal pasture mill chapel museum island"
).split()
_VERBS = "built repaired crossed painted measured carried opened closed visited described".split()


def document(i: int, rng: random.Random) -> str:
    """About 3,000 characters: paragraphs of short sentences about numbered places."""
    paragraphs = []
    for p in range(6):
        sentences = []
        for _ in range(5):
            a, b, c = rng.sample(_WORDS, 3)
            sentences.append(
                f"The {a} of district {i}-{p} was {rng.choice(_VERBS)} near the {b} "
                f"by the {c} guild in year {1700 + rng.randrange(300)}."
            )
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


class _Control:
    def stop_reason(self) -> str | None:
        return None

    def report(self, progress: Any) -> None:
        pass


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(documents: int = 60, edited: int = 3, queries: int = 100, embed_sample: int = 32, log=print) -> dict[str, Any]:
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with ready_process([PY, "-m", "bench.moto_server"], env=env, stdin=True) as (_, port):
        endpoint = f"http://127.0.0.1:{port}"
        saved = dict(os.environ)
        # LanceDB (object_store) takes credentials from the environment, as on a real worker.
        os.environ.update(env, AWS_ENDPOINT_URL=endpoint, S3_BUCKET=BUCKET)
        try:
            return _run(endpoint, documents, edited, queries, embed_sample, log)
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _run(endpoint: str, n_docs: int, n_edited: int, n_queries: int, embed_sample: int, log) -> dict[str, Any]:
    import boto3

    from contracts.keys import context_document_key
    from trainer.rag.embeddings import get_embedder
    from trainer.rag.indexing import build_index
    from trainer.rag.search import search
    from trainer.settings import TrainerSettings

    settings = TrainerSettings(S3_BUCKET=BUCKET, AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    rng = random.Random(7)
    texts = {f"doc-{i:04d}.txt": document(i, rng) for i in range(n_docs)}
    for name, text in texts.items():
        s3.put_object(Bucket=BUCKET, Key=context_document_key(USER, AVATAR, name), Body=text.encode())

    t0 = time.perf_counter()
    embedder = get_embedder(settings.embedding_model)
    model_load = time.perf_counter() - t0
    log(f"  model loaded in {model_load:.1f} s; indexing {n_docs} documents")

    def index(full: bool = False) -> dict[str, Any]:
        return build_index(
            s3,
            settings,
            USER,
            AVATAR,
            "bench",
            _Control(),
            chunk_size=settings.chunk_size,
            chunk_overlap=settings.chunk_overlap,
            full=full,
        )

    first = index()
    log(f"  first index: {first['chunks_added']} chunks in {first['seconds']:.1f} s")
    for name in list(texts)[:n_edited]:
        texts[name] = texts[name].replace("guild", "society", 1)
        s3.put_object(Bucket=BUCKET, Key=context_document_key(USER, AVATAR, name), Body=texts[name].encode())
    incremental = index()
    full = index(full=True)
    log(f"  incremental {incremental['seconds']:.2f} s vs full {full['seconds']:.2f} s")

    sample = [text[: settings.chunk_size] for text in list(texts.values())[:embed_sample]]  # chunk-sized
    embedder.embed(sample[:4])  # warm
    batched_runs, single_runs = [], []
    for _ in range(3):  # alternating rounds, medians: a shared machine's load shifts between them
        t0 = time.perf_counter()
        embedder.embed(sample, batch_size=settings.embedding_batch_size)
        batched_runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for text in sample:
            embedder.embed([text], batch_size=1)
        single_runs.append(time.perf_counter() - t0)
    batched, one_by_one = statistics.median(batched_runs), statistics.median(single_runs)

    questions = [
        f"What was {rng.choice(_VERBS)} near the {rng.choice(_WORDS)} in district {rng.randrange(n_docs)}-"
        f"{rng.randrange(6)}?"
        for _ in range(n_queries)
    ]
    search(settings, USER, AVATAR, questions[0])  # warm: connection, caches
    latencies, embed_only = [], []
    for q in questions:
        t0 = time.perf_counter()
        found = search(settings, USER, AVATAR, q, top_k=5)
        latencies.append(time.perf_counter() - t0)
        assert len(found) == 5
        t0 = time.perf_counter()
        embedder.embed_query(q)
        embed_only.append(time.perf_counter() - t0)
    filtered = []
    for q in questions[: max(1, n_queries // 2)]:
        t0 = time.perf_counter()
        search(settings, USER, AVATAR, q, top_k=5, score_threshold=0.2, filters={"missing": "key"})
        filtered.append(time.perf_counter() - t0)

    return {
        "documents": n_docs,
        "edited": n_edited,
        "chunks": first["chunks"],
        "chunk_size": settings.chunk_size,
        "chunk_overlap": settings.chunk_overlap,
        "model": embedder.name,
        "model_load": model_load,
        "first": first,
        "incremental": incremental,
        "full": full,
        "embed_sample": len(sample),
        "batched": batched,
        "one_by_one": one_by_one,
        "batch_size": settings.embedding_batch_size,
        "queries": n_queries,
        "latencies": latencies,
        "embed_only": embed_only,
        "filtered": filtered,
    }


def markdown(r: dict[str, Any], cmd: str) -> str:
    first, inc, full = r["first"], r["incremental"], r["full"]
    p = lambda xs, q: secs(_percentile(xs, q))  # noqa: E731
    index_rows = [
        [
            "first index (every document new)",
            f"{first['chunks_added']}",
            secs(first["seconds"]),
            f"**{first['chunks_per_second']:.0f}**",
            secs(first["embed_seconds"]),
            "—",
        ],
        [
            f"**incremental** re-index ({r['edited']} of {r['documents']} documents edited)",
            f"{inc['chunks_added']} (kept {inc['chunks_kept']})",
            f"**{secs(inc['seconds'])}**",
            f"{inc['chunks_per_second'] or 0:.0f}",
            secs(inc["embed_seconds"]),
            f"**{full['seconds'] / inc['seconds']:.1f}× faster** than full",
        ],
        [
            "baseline: full re-index (`full: true`)",
            f"{full['chunks_added']}",
            secs(full["seconds"]),
            f"{full['chunks_per_second']:.0f}",
            secs(full["embed_seconds"]),
            "1×",
        ],
    ]
    n = r["embed_sample"]
    embed_rows = [
        [
            f"batched (EMBEDDING_BATCH_SIZE={r['batch_size']})",
            secs(r["batched"]),
            f"**{n / r['batched']:.0f}**",
            f"**{r['one_by_one'] / r['batched']:.1f}×**",
        ],
        ["baseline: one chunk at a time", secs(r["one_by_one"]), f"{n / r['one_by_one']:.0f}", "1×"],
    ]
    lat, emb, flt = r["latencies"], r["embed_only"], r["filtered"]
    latency_rows = [
        [
            f"`search()` top 5 of {r['chunks']} chunks (avatar prefilter)",
            f"**{p(lat, 0.5)}**",
            f"**{p(lat, 0.95)}**",
            len(lat),
        ],
        ["… with a metadata filter + score threshold (no match)", p(flt, 0.5), p(flt, 0.95), len(flt)],
        ["floor: embedding the query alone", p(emb, 0.5), p(emb, 0.95), len(emb)],
    ]
    return f"""## 6. RAG: indexing throughput and retrieval latency

The index job's own code (`trainer.rag.indexing.build_index`) and `trainer.rag.search.search`
in one process on CPU, against moto in server mode (S3, no added latency), with the default
embedding model `{r["model"]}` (loaded once in {secs(r["model_load"])}). Corpus: {r["documents"]}
synthetic `.txt` documents of about 3,000 characters, chunked at {r["chunk_size"]}/{r["chunk_overlap"]}
(chunk_size/chunk_overlap) into {r["chunks"]} chunks, all of one avatar. Throughput is chunks
embedded per second of the whole job (list, download, parse, chunk, embed, one LanceDB commit on
S3, the index_meta row, compaction).

| indexing | chunks embedded | time | chunks/s | of which embedding | vs baseline |
| --- | --- | --- | --- | --- | --- |
{chr(10).join("| " + " | ".join(map(str, row)) + " |" for row in index_rows)}

Embedding alone, {n} chunks of {r["chunk_size"]} characters (median of 3 alternating rounds). On CPU
a batch gains little over single chunks (the matrix products are already large at ~180 tokens);
batches matter on a GPU, where `EMBEDDING_BATCH_SIZE` keeps it busy:

{table(["embedding", "time", "chunks/s", "vs baseline"], embed_rows)}

Retrieval latency, warm worker ({r["queries"]} queries; each call reads the avatar's index_meta row,
embeds the query and runs an exact cosine search with the avatar prefilter inside LanceDB):

{table(["retrieval", "p50", "p95", "queries"], latency_rows)}

Machine: {machine()}. Date: {today()}. Reproduce: `{cmd}` (this section: `python -m bench --only 6`).
"""
