"""RAG, the trainer side, end to end: context documents in S3 -> IndexRequest / RetrieveRequest
sent straight to the train queue (the external-service path) -> a real worker chunks, embeds
(the offline all-MiniLM-L6-v2) and writes the user's LanceDB store on S3 (moto) -> results
on the job records.

Covered: a first index, incremental re-indexes (an edit, a delete, an addition, no change,
`full`), retrieval quality on a labelled set (recall@5 >= 0.9), score threshold and metadata
filters applied inside the store, tenant isolation (another user, another avatar), and the
embedding-model mismatch refusal and re-embedding with a new model.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from contracts.keys import context_document_key, vectorstore_prefix
from contracts.messages import IndexRequest, QueueRequest, RetrieveRequest
from tests.conftest import TEST_BUCKET, Api, keys_under
from tests.pipeline import Pipeline, start_pipeline, wait_for_job
from trainer.rag.chunking import chunk_text

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# -- the labelled set: distinct made-up facts and a paraphrased question about each ------------

TARGETS: list[tuple[str, str]] = [
    (
        "Quorvath is a cold-water fish found only in the lakes of the Ezmer plateau; it changes colour from silver "
        "to deep red during the spawning season.",
        "Which fish turns red when it breeds?",
    ),
    (
        "The Tellunar clock tower in Brask was finished in 1742 and its bells were cast from melted-down cannons.",
        "What metal source were the bells of the Brask clock tower made from?",
    ),
    (
        "Mirelle Avondi invented the folding paper lantern that is carried at the Hallow Night festival of Pemberly.",
        "Who came up with the paper lanterns used at Pemberly's festival?",
    ),
    (
        "Zintari bread is baked with crushed juniper seeds and buried in hot sand for six hours.",
        "How do people cook Zintari loaves?",
    ),
    (
        "The Oskel Mountains receive almost no rain, because the Varn ridge blocks the winds from the western sea.",
        "Why is the Oskel range so dry?",
    ),
    (
        "Professor Dagny Holm showed that the glass frogs of Urumba can survive being frozen solid for three weeks.",
        "Which amphibian survives weeks of being frozen?",
    ),
    (
        "Flinders ball is a team sport played on ice with curved wooden paddles and a ball made of cork.",
        "What gear do Flinders ball players use?",
    ),
    (
        "The Peshtavi language has no words for left or right; its speakers describe every position by the compass.",
        "How do Peshtavi speakers say where things are?",
    ),
    (
        "The Rambeth satellite measured the saltiness of the oceans from orbit until it lost power in 2031.",
        "What did the Rambeth spacecraft observe?",
    ),
    (
        "Glimmerwort is a moss that glows faintly blue in caves and was once used by miners as a natural lamp.",
        "Which plant gave miners light underground?",
    ),
    (
        "The Castellan Treaty of 1610 ended the long salt war between the city states of Norrow and Ivel.",
        "Which agreement brought the salt war to an end?",
    ),
    (
        "The orchestra of Kettleby performs only once a year, on the night of the first snowfall.",
        "When does Kettleby's orchestra give its concert?",
    ),
    ("Brassfeather owls nest in abandoned chimneys and feed mainly on moths.", "What do Brassfeather owls eat?"),
    (
        "The Hollin tunnel under the Strait of Veyra is 38 kilometres long and took eleven years to dig.",
        "How many years did building the Veyra strait tunnel take?",
    ),
    (
        "Amberleaf tea is brewed from the dried bark of the sorrel pine and tastes slightly of smoke.",
        "What is Amberleaf tea made from?",
    ),
    (
        "The painter Osric Vale used only three colours in his entire career: ochre, black and sea green.",
        "Which artist limited himself to three colours?",
    ),
    (
        "Duneskip racing uses sails mounted on sleds that glide across the salt flats of Harrow.",
        "Which sport uses wind-powered sleds on salt flats?",
    ),
    (
        "The city of Lorwick banned cars from its old town in 1998 and replaced them with electric trams.",
        "When were cars banned from Lorwick's historic centre?",
    ),
    ("Thornback beetles roll balls of clay to build towers up to a metre tall.", "Which insect builds clay towers?"),
    (
        "The Vesper Codex is a medieval manuscript describing how to predict storms from the flight of swallows.",
        "Which old book explains forecasting the weather from birds?",
    ),
    (
        "Marrowfield cheese is aged in salt caves for two years and rubbed with ash every month.",
        "How is Marrowfield cheese matured?",
    ),
    (
        "The inventor Tobiah Crane built a calculating machine powered by a water wheel in 1821.",
        "Who built a water-driven calculator?",
    ),
    (
        "The sirenhorn is a brass instrument with seven bells, played at weddings in the Isles of Carrow.",
        "What instrument is played at Carrow weddings?",
    ),
    (
        "The Pellan glacier retreats about forty metres each summer, exposing ancient pine trunks.",
        "What is revealed as the Pellan glacier melts back?",
    ),
    (
        "Nightjar fever is a rare illness caught from the bite of sand flies; its first sign is a purple rash.",
        "What is the first symptom of nightjar fever?",
    ),
    (
        "Harbourmaster Elin Roke ruled that ships in Fenmouth must fly a green flag when carrying grain.",
        "What flag do grain ships at Fenmouth have to show?",
    ),
    (
        "Quillon Stadium has a retractable roof made of woven bamboo panels.",
        "What material is the Quillon Stadium roof made of?",
    ),
    (
        "Cobalt finches migrate 6,000 kilometres from the tundra of Vask to the islands of Mere every autumn.",
        "How far do cobalt finches travel on migration?",
    ),
    (
        "The Aldermoor school teaches children to navigate by the stars before they learn to read maps.",
        "Which school teaches star navigation before map reading?",
    ),
    (
        "The Redwater springs in Calloway are warm all year, and their iron stains the rocks a rusty orange.",
        "Why are the rocks orange around the Calloway springs?",
    ),
    (
        "Hexmarch is a chess variant played on a board of hexagons with two kings per player.",
        "Which chess game uses a hexagonal board?",
    ),
    (
        "The Sunvale vineyards cover their grapes with silk nets to keep parrots away.",
        "How do Sunvale vineyards protect the grapes from birds?",
    ),
    (
        "The poet Ysolde Marr wrote her entire epic in the margins of old tax records.",
        "Where did Ysolde Marr write her long poem?",
    ),
    (
        "The Grelling bridge can be raised by a single person turning a crank, thanks to counterweights of "
        "river stone.",
        "How can one person lift the Grelling bridge?",
    ),
    (
        "Frostcap mushrooms grow only on birch trees after the first frost and are poisonous when eaten raw.",
        "Which mushroom is toxic unless cooked?",
    ),
    (
        "The merchant guild of Tarsis kept its accounts on knotted cords instead of paper.",
        "How did the Tarsis merchants record their accounts?",
    ),
]

_FILLER_NAMES = [
    "Abrel",
    "Bocca",
    "Cendra",
    "Dovrin",
    "Elsk",
    "Farrow",
    "Gintor",
    "Hesket",
    "Ilvar",
    "Jossa",
    "Kemble",
    "Lunde",
]
_FILLER_TEMPLATES = [
    "The village of {n} holds a market every {d} where farmers sell potatoes and wool.",
    "{n} is a small island with a lighthouse and a population of about {k} hundred people.",
    "The {n} company makes bicycle parts in a factory beside the canal, employing {k} hundred workers.",
    "{n} Park is home to red deer and is open to visitors from spring until late autumn.",
    "The singer {n} released an album of love songs recorded in a barn on {d} evenings.",
    "{n} Lake freezes every winter and is used for skating on {d} afternoons.",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


def labelled_records() -> list[dict[str, Any]]:
    """108 passages: the 36 targets and 72 fillers; metadata `pid` identifies each."""
    records = [
        {"text": text, "metadata": {"pid": i, "kind": "target", "even": i % 2 == 0}}
        for i, (text, _) in enumerate(TARGETS)
    ]
    for t, template in enumerate(_FILLER_TEMPLATES):
        for j, name in enumerate(_FILLER_NAMES):
            pid = len(records)
            records.append(
                {
                    "text": template.format(n=name, d=_DAYS[(t + j) % 6], k=j + 2),
                    "metadata": {"pid": pid, "kind": "filler", "even": pid % 2 == 0},
                }
            )
    return records


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


NOTES_V1 = (
    "Avatune notes. The zebra crossing on Mallory Street was painted purple in 2020. "
    "The town council meets on the second Tuesday of every month.\n"
)
NOTES_V2 = (
    "Avatune notes, revised. The zebra crossing on Mallory Street was repainted white in 2024. "
    "The council now meets every Friday morning in the library.\n"
)
GUIDE = "# Guide\n\nThe ferry to Osprey Point leaves at dawn. Tickets are sold at the harbour kiosk.\n"
EXTRA = "# Extra\n\nThe old mill on Fen Lane grinds barley for the brewery.\n"

# -- helpers ------------------------------------------------------------------------------------


def put_context(s3, user_id: str, avatar_id: str, name: str, body: bytes) -> None:
    s3.put_object(Bucket=TEST_BUCKET, Key=context_document_key(user_id, avatar_id, name), Body=body)


def delete_context(s3, user_id: str, avatar_id: str, name: str) -> None:
    s3.delete_object(Bucket=TEST_BUCKET, Key=context_document_key(user_id, avatar_id, name))


def send(pipeline: Pipeline, request: QueueRequest) -> str:
    return pipeline.send(request)


def index_request(api: Api, **fields: Any) -> IndexRequest:
    return IndexRequest(
        schema="avatune.index-request/v1",
        job_id="idx-" + uuid.uuid4().hex[:12],
        user_id=api.user_id,
        avatar_id=api.avatar_id,
        **fields,
    )


def retrieve_request(api: Api, query: str, **fields: Any) -> RetrieveRequest:
    return RetrieveRequest(
        schema="avatune.retrieve-request/v1",
        job_id="ret-" + uuid.uuid4().hex[:12],
        user_id=api.user_id,
        avatar_id=api.avatar_id,
        query=query,
        **fields,
    )


def run(pipeline: Pipeline, api: Api, request: QueueRequest) -> dict[str, Any]:
    """Send the request, wait for its job to end, return the job."""
    send(pipeline, request)
    done, _ = wait_for_job(api, request.job_id, {"succeeded", "failed", "cancelled"}, pipeline=pipeline)
    return done


def index(pipeline: Pipeline, api: Api, **fields: Any) -> dict[str, Any]:
    done = run(pipeline, api, index_request(api, **fields))
    assert done["status"] == "succeeded", done
    assert done["type"] == "index"
    return done["result"]


def retrieve(pipeline: Pipeline, api: Api, query: str, **fields: Any) -> list[dict[str, Any]]:
    done = run(pipeline, api, retrieve_request(api, query, **fields))
    assert done["status"] == "succeeded", done
    assert done["result"]["embedding_model"] == DEFAULT_MODEL
    return done["result"]["passages"]


def counts(result: dict[str, Any]) -> dict[str, int]:
    return {k: result[k] for k in ("documents_added", "documents_changed", "documents_removed", "documents_kept")}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


@pytest.fixture(scope="module")
def indexed(pipeline: Pipeline, worker, s3) -> Api:
    """An avatar whose labelled set (one JSONL) and two small documents are indexed."""
    api = pipeline.client()
    put_context(s3, api.user_id, api.avatar_id, "facts.jsonl", jsonl(labelled_records()))
    put_context(s3, api.user_id, api.avatar_id, "notes.txt", NOTES_V1.encode())
    put_context(s3, api.user_id, api.avatar_id, "guide.md", GUIDE.encode())
    result = index(pipeline, api)
    assert counts(result) == {"documents_added": 3, "documents_changed": 0, "documents_removed": 0, "documents_kept": 0}
    api.first_index = result  # type: ignore[attr-defined]
    yield api
    api.close()


# -- tests --------------------------------------------------------------------------------------


def test_chunks_are_exact_sentence_aligned_slices_with_overlap() -> None:
    sentences = [f"Sentence number {i} talks about topic {i * 7 % 13}." for i in range(40)]
    text = "Intro line without a stop\n\n" + " ".join(sentences) + " " + "x" * 250 + " tail words here"
    chunks = chunk_text(text, 120, 50)
    assert all(text[c.start : c.end] == c.text and 0 < len(c.text) <= 120 for c in chunks)
    # A blank line ends a sentence (here the next one would not fit beside it).
    assert chunk_text(text, 60, 0)[0].text == "Intro line without a stop"
    body = [c for c in chunks if c.text.startswith("Sentence")]
    assert all(c.text.endswith(".") for c in body)  # cut at sentence ends, never inside one
    # Neighbours share whole sentences (at most chunk_overlap characters), and the text is covered.
    assert all(0 < b.start < a.end and a.end - b.start <= 50 for a, b in zip(body, body[1:]))
    covered = set().union(*(range(c.start, c.end) for c in chunks))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    assert [len(c.text) for c in chunk_text("y" * 300, 120, 0)] == [120, 120, 60]  # one long word: hard cuts
    with pytest.raises(ValueError):
        chunk_text(text, 100, 100)


MARKDOWN = """# Freezing bread

Cool the loaf completely. Slice it before it goes in. Then freeze the slices.

## Rice
Rinse the rice twice. Cook it in salted water for twelve minutes. Let it rest, covered.

```sh
# a comment in a code block, not a heading
```

Noodles
=======

Boil them in plenty of water. Drain and toss with oil.
"""


def test_markdown_headings_start_chunks() -> None:
    from trainer.rag.indexing import chunk_document

    chunks = chunk_text(MARKDOWN, 120, 60, markdown=True)
    assert all(MARKDOWN[c.start : c.end] == c.text and len(c.text) <= 120 for c in chunks)
    # Each heading opens a chunk, with the first sentences of its own section beside it...
    openers = [c.text.split("\n", 1)[0] for c in chunks if c.text.startswith(("#", "Noodles"))]
    assert openers == ["# Freezing bread", "## Rice", "Noodles"]
    rice = next(c for c in chunks if c.text.startswith("## Rice"))
    assert rice.text.startswith("## Rice\nRinse the rice twice.")
    # ...and is never the tail of the previous section's chunk, nor reached back across by overlap.
    for chunk in chunks:
        for heading in ("## Rice", "Noodles\n====", "# Freezing"):
            assert heading not in chunk.text or chunk.text.startswith(heading)
    assert not any("freeze the slices" in c.text and "Rinse" in c.text for c in chunks)
    # A '#' line inside a fenced code block is not a heading.
    assert not any(c.text.startswith("# a comment") for c in chunks)
    # Plain text keeps the sentence packing (the heading trails the previous chunk there).
    plain = chunk_text(MARKDOWN, 120, 60)
    assert any(c.text.endswith("## Rice\nRinse the rice twice.") or "slices.\n\n## Rice" in c.text for c in plain)
    # The index job chunks a .md document this way, a .txt one the plain way.
    md = [c.text for c in chunk_document("guide.md", "e1", MARKDOWN.encode(), 120, 60)]
    assert md == [c.text for c in chunks]
    txt = [c.text for c in chunk_document("guide.txt", "e1", MARKDOWN.encode(), 120, 60)]
    assert txt == [c.text for c in plain]


def test_index_then_incremental_reindex(pipeline: Pipeline, indexed: Api, s3) -> None:
    api = indexed
    first = api.first_index  # type: ignore[attr-defined]
    facts_chunks = len(labelled_records())  # each short record is one chunk
    notes_chunks = len(chunk_text(NOTES_V1, first["chunk_size"], first["chunk_overlap"]))
    assert first["embedding_model"] == DEFAULT_MODEL and first["dimension"] == 384
    assert first["full"] is False and first["chunks_removed"] == 0 and first["chunks_kept"] == 0
    assert first["chunks_added"] == first["chunks"] == facts_chunks + notes_chunks + 1
    assert first["seconds"] > 0 and first["chunks_per_second"] > 0
    # The store lives under the user's vectorstore/ prefix, on S3.
    keys = keys_under(s3, vectorstore_prefix(api.user_id))
    assert any(k.endswith(".lance") for k in keys) and all(k.startswith(vectorstore_prefix(api.user_id)) for k in keys)

    # An edit, a delete and an addition: only notes.txt and extra.md are embedded again.
    put_context(s3, api.user_id, api.avatar_id, "notes.txt", NOTES_V2.encode())
    delete_context(s3, api.user_id, api.avatar_id, "guide.md")
    put_context(s3, api.user_id, api.avatar_id, "extra.md", EXTRA.encode())
    second = index(pipeline, api)
    assert counts(second) == {"documents_added": 1, "documents_changed": 1, "documents_removed": 1, "documents_kept": 1}
    assert (second["added"], second["changed"], second["removed"]) == (["extra.md"], ["notes.txt"], ["guide.md"])
    new_notes_chunks = len(chunk_text(NOTES_V2, first["chunk_size"], first["chunk_overlap"]))
    assert second["chunks_kept"] == facts_chunks
    assert second["chunks_added"] == new_notes_chunks + 1
    assert second["chunks_removed"] == notes_chunks + 1
    assert second["chunks"] == facts_chunks + new_notes_chunks + 1

    # The edit is what retrieval sees now; the deleted document is gone.
    top = retrieve(pipeline, api, "What colour is the zebra crossing on Mallory Street?", top_k=1)[0]
    assert top["source"] == "notes.txt" and "white" in top["text"]
    assert NOTES_V2[top["start"] : top["end"]] == top["text"]  # offsets locate the passage in its document
    head = s3.head_object(Bucket=TEST_BUCKET, Key=context_document_key(api.user_id, api.avatar_id, "notes.txt"))
    assert top["etag"] == head["ETag"].strip('"')
    ferry = retrieve(pipeline, api, "When does the ferry to Osprey Point leave?", top_k=5)
    assert all(p["source"] != "guide.md" for p in ferry)

    # Nothing changed: nothing embedded.
    third = index(pipeline, api)
    assert counts(third) == {"documents_added": 0, "documents_changed": 0, "documents_removed": 0, "documents_kept": 3}
    assert third["chunks_added"] == third["chunks_removed"] == 0 and third["chunks_kept"] == second["chunks"]

    # full: everything again; so does a new chunking.
    full = index(pipeline, api, full=True)
    assert full["full"] is True and full["full_reason"] == "requested"
    assert counts(full) == {"documents_added": 0, "documents_changed": 3, "documents_removed": 0, "documents_kept": 0}
    assert full["chunks_added"] == full["chunks_removed"] == second["chunks"] and full["chunks_kept"] == 0
    rechunked = index(pipeline, api, chunk_size=64, chunk_overlap=16)
    assert rechunked["full"] is True and "chunking changed" in rechunked["full_reason"]
    assert rechunked["documents_changed"] == 3 and rechunked["chunks"] > second["chunks"]
    back = index(pipeline, api, chunk_size=first["chunk_size"], chunk_overlap=first["chunk_overlap"])
    assert back["chunks"] == second["chunks"] and back["documents_changed"] == 3


def test_retrieval_recall_at_5_on_the_labelled_set(pipeline: Pipeline, indexed: Api) -> None:
    api = indexed
    requests = [retrieve_request(api, question, top_k=5) for _, question in TARGETS]
    for request in requests:  # all queued at once; the avatar's jobs run one after another
        send(pipeline, request)
    hits = 0
    for pid, request in enumerate(requests):
        done, _ = wait_for_job(api, request.job_id, {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded", done
        passages = done["result"]["passages"]
        assert len(passages) == 5
        scores = [p["score"] for p in passages]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        hits += any(p["metadata"].get("pid") == pid for p in passages)
    recall = hits / len(TARGETS)
    print(
        f"\nrecall@5 = {recall:.3f} ({hits}/{len(TARGETS)} queries, {len(labelled_records())} passages, "
        f"{DEFAULT_MODEL})"
    )
    assert len(TARGETS) >= 30 and len(labelled_records()) >= 100
    assert recall >= 0.9


def test_score_threshold_and_metadata_filters(pipeline: Pipeline, indexed: Api) -> None:
    api = indexed
    question = TARGETS[12][1]  # Brassfeather owls
    unfiltered = retrieve(pipeline, api, question, top_k=10)
    assert unfiltered[0]["metadata"]["pid"] == 12
    threshold = (unfiltered[0]["score"] + unfiltered[1]["score"]) / 2
    above = retrieve(pipeline, api, question, top_k=10, score_threshold=threshold)
    assert [p["chunk_id"] for p in above] == [unfiltered[0]["chunk_id"]]
    assert retrieve(pipeline, api, question, top_k=10, score_threshold=0.999) == []

    # Filters run inside the search: a far-off passage is still found when it is the only match
    # (a post-filter over the unfiltered top 10 would return nothing).
    assert all(p["metadata"].get("pid") != 40 for p in unfiltered)
    only = retrieve(pipeline, api, question, top_k=10, filters={"pid": 40})
    assert [p["metadata"]["pid"] for p in only] == [40]
    fillers = retrieve(pipeline, api, question, top_k=10, filters={"kind": "filler", "even": True})
    assert len(fillers) == 10
    assert all(p["metadata"]["kind"] == "filler" and p["metadata"]["even"] is True for p in fillers)
    assert retrieve(pipeline, api, question, top_k=10, filters={"kind": "nothing-like-this"}) == []
    assert retrieve(pipeline, api, question, top_k=10, filters={"pid": "12"}) == []  # "12" is not 12
    assert [p["metadata"]["pid"] for p in retrieve(pipeline, api, question, top_k=3, filters={"pid": 12.0})] == [12]


def test_tenant_isolation(pipeline: Pipeline, indexed: Api, s3) -> None:
    """Another user with the same avatar id, and another avatar of the same user, each see
    only their own chunks."""
    secret = "The vault code of the Ilmari observatory is hidden under the third telescope."
    other_user = Api(pipeline.api_url, "u-" + uuid.uuid4().hex[:10], indexed.avatar_id)
    sibling = Api(pipeline.api_url, indexed.user_id, "avatar-2")
    with other_user, sibling:
        put_context(s3, other_user.user_id, other_user.avatar_id, "secret.txt", secret.encode())
        put_context(s3, sibling.user_id, sibling.avatar_id, "sibling.txt", secret.replace("Ilmari", "Sibling").encode())
        assert index(pipeline, other_user)["chunks_added"] == 1
        assert index(pipeline, sibling)["chunks_added"] == 1

        question = "Where is the vault code of the observatory hidden?"
        mine = retrieve(pipeline, indexed, question, top_k=100)
        assert mine and all(p["source"] not in {"secret.txt", "sibling.txt"} for p in mine)
        assert all(p["chunk_id"].startswith(indexed.avatar_id + ":") for p in mine)
        theirs = retrieve(pipeline, other_user, question, top_k=100)
        assert [p["source"] for p in theirs] == ["secret.txt"] and "Ilmari" in theirs[0]["text"]
        siblings = retrieve(pipeline, sibling, question, top_k=100)
        assert [p["source"] for p in siblings] == ["sibling.txt"]
        # Stores are per user: the other user's store is under its own prefix.
        assert keys_under(s3, vectorstore_prefix(other_user.user_id))

        # A document the parser refuses fails the index job, naming it; nothing changes.
        put_context(s3, sibling.user_id, sibling.avatar_id, "bad.jsonl", b'{"txt": "typo"}\n')
        failed = run(pipeline, sibling, index_request(sibling))
        assert failed["status"] == "failed" and "context document 'bad.jsonl' is invalid" in failed["error"]
        assert [p["source"] for p in retrieve(pipeline, sibling, question)] == ["sibling.txt"]
        # Every document deleted: the avatar's chunks go, the index stays (empty).
        delete_context(s3, sibling.user_id, sibling.avatar_id, "bad.jsonl")
        delete_context(s3, sibling.user_id, sibling.avatar_id, "sibling.txt")
        emptied = index(pipeline, sibling)
        assert emptied["documents_removed"] == 1 and emptied["chunks_removed"] == 1 and emptied["chunks"] == 0
        assert retrieve(pipeline, sibling, question) == []
        assert retrieve(pipeline, indexed, question, top_k=100) == mine  # the sibling's commit left ours alone

        # An avatar without an index: a clear failure.
        empty = Api(pipeline.api_url, indexed.user_id, "avatar-none")
        with empty:
            failed = run(pipeline, empty, retrieve_request(empty, question))
        assert failed["status"] == "failed" and "has no vector index" in failed["error"]


def test_embedding_model_mismatch_is_refused_and_a_new_model_reindexes(
    pipeline: Pipeline, worker, s3, tiny_model_dir: Path, tmp_path_factory
) -> None:
    """A worker with another EMBEDDING_MODEL (the same weights under another name: a local
    path) refuses to query an index built with the default model, and its index job embeds
    everything again with its own model."""
    from trainer.rag.embeddings import bundled_model_dir

    api = pipeline.client("avatar-model")
    put_context(s3, api.user_id, api.avatar_id, "one.txt", NOTES_V1.encode())
    put_context(s3, api.user_id, api.avatar_id, "two.md", GUIDE.encode())
    built = index(pipeline, api)
    assert built["documents_added"] == 2

    other_model = str(bundled_model_dir())
    other = start_pipeline(tmp_path_factory.mktemp("other-model"), tiny_model_dir)
    try:
        other.start_worker(EMBEDDING_MODEL=other_model)
        refused = run(other, api, retrieve_request(api, "When does the ferry leave?"))
        assert refused["status"] == "failed", refused
        assert f"built with '{DEFAULT_MODEL}'" in refused["error"] and other_model in refused["error"]
        assert "re-index" in refused["error"]

        done = run(other, api, index_request(api))
        assert done["status"] == "succeeded", done
        rebuilt = done["result"]
        assert rebuilt["embedding_model"] == other_model and rebuilt["full"] is True
        assert "embedding model changed" in rebuilt["full_reason"]
        assert counts(rebuilt) == {
            "documents_added": 0,
            "documents_changed": 2,
            "documents_removed": 0,
            "documents_kept": 0,
        }
        assert rebuilt["chunks_added"] == rebuilt["chunks_removed"] == built["chunks"]
        found = run(other, api, retrieve_request(api, "When does the ferry leave?", top_k=1))
        assert found["status"] == "succeeded" and found["result"]["passages"][0]["source"] == "two.md"
        assert found["result"]["embedding_model"] == other_model
    finally:
        other.stop_workers()
    # Now the default worker is the one with the other model.
    refused = run(pipeline, api, retrieve_request(api, "When does the ferry leave?"))
    assert refused["status"] == "failed" and f"built with '{other_model}'" in refused["error"]


def test_through_the_api_routes(pipeline: Pipeline, worker) -> None:
    """The user-facing path: PUT a context document, POST .../context/index, POST .../retrievals;
    the worker's results on the job records."""
    with pipeline.client("avatar-api") as api:
        r = api.put(f"{api.base}/context/notes.txt", content=NOTES_V2.encode())
        assert r.status_code in (200, 201), r.text
        r = api.post(f"{api.base}/context/index", json={"chunk_size": 200, "chunk_overlap": 40})
        assert r.status_code == 202, r.text
        done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded" and done["type"] == "index", done
        assert done["result"]["documents_added"] == 1 and done["result"]["chunk_size"] == 200
        r = api.post(f"{api.base}/retrievals", json={"query": "Where does the council meet?", "top_k": 1})
        assert r.status_code == 202, r.text
        done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
        assert done["status"] == "succeeded" and done["type"] == "retrieve", done
        [passage] = done["result"]["passages"]
        assert passage["source"] == "notes.txt" and "library" in passage["text"]
        assert NOTES_V2[passage["start"] : passage["end"]] == passage["text"]
