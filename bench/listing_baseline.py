"""The straightforward listing, the baseline of benchmark 1: `list_objects_v2` pages, then one
`get_object_tagging` per key, one after another."""

from __future__ import annotations

from typing import Any

from contracts.keys import document_name_from_key, training_data_prefix
from contracts.tags import flag_from_tagset
from handlers.avatar_ref import AvatarRef
from handlers.s3_objects import LIST_PAGE_SIZE
from handlers.training_data_store import TrainingDataStore, TrainingDocument, content_type_or_default


class StraightforwardStore(TrainingDataStore):
    async def list(
        self, ref: AvatarRef, flag: bool | None, limit: int, after: str | None = None
    ) -> tuple[list[TrainingDocument], str | None]:
        prefix = training_data_prefix(ref.user_id, ref.avatar_id)
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix, "MaxKeys": LIST_PAGE_SIZE}
        if after:
            kwargs["StartAfter"] = prefix + after
        items: list[TrainingDocument] = []
        while True:
            resp = await self._s3.list_objects_v2(**kwargs)
            for obj in resp.get("Contents", []):
                name = document_name_from_key(obj["Key"], prefix)
                if name is None:
                    continue
                tags = await self._s3.get_object_tagging(Bucket=self._bucket, Key=obj["Key"])
                doc_flag = flag_from_tagset(tags.get("TagSet", []))
                if flag is not None and doc_flag != flag:
                    continue
                if len(items) == limit:
                    return items, items[-1].name
                items.append(
                    TrainingDocument(
                        name=name,
                        size=obj["Size"],
                        etag=obj["ETag"].strip('"'),
                        last_modified=obj["LastModified"],
                        use_for_training=doc_flag,
                        content_type=content_type_or_default(name),
                    )
                )
            if not resp.get("IsTruncated"):
                return items, None
            kwargs.pop("StartAfter", None)
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]
