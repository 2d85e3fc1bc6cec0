"""'Delete all unused' racing writers: a document that is flagged `true` when the delete reaches it
survives (a PATCH to true, or a re-upload, between the listing and the delete), and nothing else
does. The interleaving is made deterministic by listing first, writing through the real API, then
handing the stale listing to the store's delete."""

from __future__ import annotations

import asyncio
import os

from handlers.avatar_ref import AvatarRef
from handlers.training_data_store import TrainingDataStore, TrainingDocument
from tests.conftest import TEST_BUCKET, Api, chat_line


def _run(body) -> object:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async def main() -> object:
        async with get_session().create_client(
            "s3",
            endpoint_url=os.environ["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            config=AioConfig(signature_version="s3v4"),
        ) as s3:
            return await body(TrainingDataStore(s3, TEST_BUCKET, 16))

    return asyncio.run(main())


def _listed(ref: AvatarRef) -> list[TrainingDocument]:
    async def body(store: TrainingDataStore) -> list[TrainingDocument]:
        return [doc async for doc in store.iter_all(ref, False)]

    return _run(body)  # type: ignore[return-value]


def _delete(ref: AvatarRef, docs: list[TrainingDocument]) -> int:
    async def body(store: TrainingDataStore) -> int:
        return await store.delete_listed(ref, docs, False)

    return _run(body)  # type: ignore[return-value]


def test_a_document_flagged_true_after_the_listing_survives_delete_unused(api: Api) -> None:
    ref = AvatarRef(api.user_id, api.avatar_id)
    for name in ("patched.jsonl", "reuploaded.jsonl", "renewed.jsonl", "unused.jsonl"):
        assert api.put_doc(name, chat_line("q", "a"), flag=False).status_code == 201
    listed = _listed(ref)
    assert sorted(d.name for d in listed) == ["patched.jsonl", "renewed.jsonl", "reuploaded.jsonl", "unused.jsonl"]
    # Between the listing and the delete: a PATCH to true (same bytes: same ETag), a re-upload
    # of the same bytes flagged true (same ETag), a re-upload with new content (new ETag).
    assert api.patch(f"{api.docs}/patched.jsonl", json={"use_for_training": True}).status_code == 200
    assert api.put_doc("reuploaded.jsonl", chat_line("q", "a"), flag=True).status_code == 200
    assert api.put_doc("renewed.jsonl", chat_line("q2", "a2"), flag=False).status_code == 200

    assert _delete(ref, listed) == 1
    items = {d["name"]: d["use_for_training"] for d in api.get(api.docs).json()["items"]}
    assert items == {"patched.jsonl": True, "reuploaded.jsonl": True, "renewed.jsonl": False}
    assert api.get(f"{api.docs}/patched.jsonl").content == chat_line("q", "a")


def test_delete_unused_through_the_api_keeps_used_documents(api: Api) -> None:
    assert api.put_doc("keep.jsonl", chat_line("q", "a"), flag=True).status_code == 201
    assert api.put_doc("drop.jsonl", chat_line("q", "b"), flag=False).status_code == 201
    r = api.delete(api.docs, params={"use_for_training": "false"})
    assert r.status_code == 200 and r.json() == {"deleted": 1}
    assert [d["name"] for d in api.get(api.docs).json()["items"]] == ["keep.jsonl"]
