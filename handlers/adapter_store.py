"""An avatar's adapter in S3: the stored configuration (`adapters/config.json`), the current
adapter files and their manifest (`adapters/manifest.json`, written last), and the kept
versions (`adapters/versions/{n}/`). The only module of the API that touches those keys.

The trainer publishes versions (with samples.json and loss.png beside each metrics.json); the
API reads them, serves a version's files, promotes one over the current files and deletes the
whole adapter (with the avatar's merged and full models and its exports, `exports/{n}/{format}/`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel

from contracts.adapter import AdapterSettings
from contracts.adapters import (
    CURRENT_LOCK_SECONDS,
    CURRENT_LOCK_WAIT_SECONDS,
    AdapterManifest,
    CurrentAdapterLock,
    ExportManifest,
    FullModelManifest,
    MergedManifest,
    VersionMetrics,
)
from contracts.conditional import write_attempts
from contracts.jobs import utcnow
from contracts.keys import (
    ADAPTER_FILES,
    EXPORT_FORMATS,
    EXPORT_MANIFEST_FILE,
    FULL_MODEL_MANIFEST_FILE,
    LOSS_CURVE_FILE,
    MERGED_MANIFEST_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    adapter_config_key,
    adapter_manifest_key,
    adapter_prefix,
    adapter_version_prefix,
    adapter_versions_prefix,
    checkpoints_prefix,
    current_adapter_lock_key,
    export_prefix,
    exports_prefix,
    full_model_prefix,
    full_model_version_prefix,
    merged_prefix,
    merged_version_prefix,
    version_file_key,
)
from handlers.avatar_ref import AvatarRef
from handlers.s3_json import S3Json
from handlers.s3_objects import OpenedObject, delete_keys, open_object

# The files kept beside a version's adapter that the API serves, and their content types
# (fixed here, never taken from the stored object).
VERSION_FILES: dict[str, str] = {
    METRICS_FILE: "application/json",
    SAMPLES_FILE: "application/json",
    LOSS_CURVE_FILE: "image/png",
}


WholeModelKind = Literal["merged", "full"]
WholeModelManifest = MergedManifest | FullModelManifest
# kind -> (the avatar's prefix of that kind, a version's prefix, the manifest's file name, its model)
_WHOLE_MODELS: dict[str, tuple[Callable[[str, str], str], Callable[[str, str, int], str], str, type[BaseModel]]] = {
    "merged": (merged_prefix, merged_version_prefix, MERGED_MANIFEST_FILE, MergedManifest),
    "full": (full_model_prefix, full_model_version_prefix, FULL_MODEL_MANIFEST_FILE, FullModelManifest),
}


class AdapterFile(BaseModel):
    """A current adapter file: a presigned GET URL and the sha256 the manifest names."""

    name: str
    url: str
    sha256: str | None


class VersionNotFound(Exception):
    pass


class VersionFileNotFound(Exception):
    pass


class CurrentAdapterBusy(Exception):
    """Another change of the current adapter held its lock for longer than we wait."""


class AdapterStore:
    """Typed access to one bucket's adapters."""

    def __init__(self, s3: Any, bucket: str, max_concurrency: int = 64) -> None:
        self._s3 = s3
        self._bucket = bucket
        self.objects = S3Json(s3, bucket, max_concurrency)

    # -- configuration ----------------------------------------------------------------------

    async def config(self, ref: AvatarRef) -> AdapterSettings | None:
        """The stored configuration (only the fields ever set), or None when there is none."""
        loaded = await self.objects.read(adapter_config_key(ref.user_id, ref.avatar_id))
        return AdapterSettings.model_validate_json(loaded[0]) if loaded else None

    async def update_config(
        self, ref: AvatarRef, patch: AdapterSettings, check: Callable[[AdapterSettings], None] | None = None
    ) -> AdapterSettings:
        """Apply `patch` to the stored configuration (`AdapterSettings.patched_over`: null resets a
        field) and store the result (set fields only), guarded by If-Match / If-None-Match
        against a concurrent update. `check` sees the result before it is stored and raises to
        refuse it (nothing is written then)."""
        key = adapter_config_key(ref.user_id, ref.avatar_id)
        for _ in write_attempts("the adapter configuration"):
            loaded = await self.objects.read(key)
            stored = AdapterSettings.model_validate_json(loaded[0]) if loaded else AdapterSettings()
            merged = patch.patched_over(stored)
            if check is not None:
                check(merged)
            body = json.dumps(merged.model_dump(exclude_none=True), sort_keys=True).encode()
            if await self.objects.put_if(key, body, loaded[1] if loaded else None):
                return merged
        raise AssertionError("unreachable: write_attempts raises StoreBusy")

    # -- the current adapter ----------------------------------------------------------------

    async def manifest(self, ref: AvatarRef) -> AdapterManifest | None:
        loaded = await self.objects.read(adapter_manifest_key(ref.user_id, ref.avatar_id))
        return AdapterManifest.model_validate_json(loaded[0]) if loaded else None

    async def files(self, ref: AvatarRef, manifest: AdapterManifest, expires_in: int) -> list[AdapterFile]:
        """Presigned (SigV4) GET URLs of the current adapter files."""
        files = {name: manifest.files.get(name) for name in ADAPTER_FILES}
        return await self.presigned(adapter_prefix(ref.user_id, ref.avatar_id), files, expires_in)

    async def presigned(self, prefix: str, files: dict[str, str | None], expires_in: int) -> list[AdapterFile]:
        """Presigned GET URLs of `prefix + name` for each file name -> sha256 of `files`."""

        async def one(name: str, sha256: str | None) -> AdapterFile:
            url = await self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": prefix + name}, ExpiresIn=expires_in
            )
            return AdapterFile(name=name, url=url, sha256=sha256)

        return list(await asyncio.gather(*(one(name, sha) for name, sha in files.items())))

    # -- whole models: merged/{n}/ (fuse jobs) and full/{n}/ (full fine-tunes) -------------

    async def whole_model(self, ref: AvatarRef, kind: WholeModelKind, version: int) -> WholeModelManifest | None:
        """The manifest of `merged/{version}/` or `full/{version}/`; None until it is complete
        (the manifest is written last) or when it does not exist."""
        _, _, manifest_file, model = _WHOLE_MODELS[kind]
        loaded = await self.objects.read(self.whole_model_prefix(ref, kind, version) + manifest_file)
        return model.model_validate_json(loaded[0]) if loaded else None  # type: ignore[return-value]

    async def whole_models(self, ref: AvatarRef, kind: WholeModelKind) -> list[tuple[int, WholeModelManifest]]:
        """(version, manifest) of every complete merged or full model, by version ascending."""
        prefix = _WHOLE_MODELS[kind][0]
        _, children = await self.objects.objects(prefix(ref.user_id, ref.avatar_id), delimiter="/")
        numbers = sorted(int(c) for c in children if c.isdigit() and int(c) >= 1)
        manifests = await asyncio.gather(*(self.whole_model(ref, kind, n) for n in numbers))
        return [(n, m) for n, m in zip(numbers, manifests, strict=True) if m is not None]

    def whole_model_prefix(self, ref: AvatarRef, kind: WholeModelKind, version: int) -> str:
        return _WHOLE_MODELS[kind][1](ref.user_id, ref.avatar_id, version)

    # -- exports: exports/{n}/{format}/ (export jobs) ----------------------------------------

    async def export(self, ref: AvatarRef, version: int, export_format: str) -> ExportManifest | None:
        """The manifest of version `version` exported as `export_format`; None until it is complete."""
        loaded = await self.objects.read(
            export_prefix(ref.user_id, ref.avatar_id, version, export_format) + EXPORT_MANIFEST_FILE
        )
        return ExportManifest.model_validate_json(loaded[0]) if loaded else None

    async def exports(self, ref: AvatarRef) -> list[ExportManifest]:
        """Every complete export, by version, then format."""
        _, children = await self.objects.objects(exports_prefix(ref.user_id, ref.avatar_id), delimiter="/")
        numbers = sorted(int(c) for c in children if c.isdigit() and int(c) >= 1)
        found = await asyncio.gather(*(self.export(ref, n, f) for n in numbers for f in EXPORT_FORMATS))
        return [m for m in found if m is not None]

    def export_prefix(self, ref: AvatarRef, version: int, export_format: str) -> str:
        return export_prefix(ref.user_id, ref.avatar_id, version, export_format)

    async def adapters_of(self, user_id: str) -> list[tuple[str, AdapterManifest]]:
        """(avatar_id, manifest) of each of the user's avatars that has an adapter, by avatar id."""
        avatar_ids = await self.objects.avatar_ids(user_id)
        manifests = await asyncio.gather(*(self.manifest(AvatarRef(user_id, a)) for a in avatar_ids))
        return [(a, m) for a, m in zip(avatar_ids, manifests, strict=True) if m is not None]

    # -- versions ---------------------------------------------------------------------------

    async def _version_metrics(self, ref: AvatarRef, version: int) -> VersionMetrics | None:
        key = adapter_version_prefix(ref.user_id, ref.avatar_id, version) + METRICS_FILE
        loaded = await self.objects.read(key)
        if loaded is None:
            return None
        return VersionMetrics.model_validate_json(loaded[0]).model_copy(update={"version": version})

    async def version(self, ref: AvatarRef, version: int) -> VersionMetrics | None:
        """A complete version's metrics.json; None when there is no such complete version."""
        return await self._version_metrics(ref, version)

    async def versions(self, ref: AvatarRef) -> list[VersionMetrics]:
        """Every complete version (one with its metrics.json, which the trainer writes after the
        files), by version ascending."""
        _, children = await self.objects.objects(adapter_versions_prefix(ref.user_id, ref.avatar_id), delimiter="/")
        numbers = sorted(int(c) for c in children if c.isdigit() and int(c) >= 1)
        metrics = await asyncio.gather(*(self._version_metrics(ref, n) for n in numbers))
        return [m for m in metrics if m is not None]

    async def _sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        resp = await self._s3.get_object(Bucket=self._bucket, Key=key)
        async with resp["Body"] as body:
            async for chunk in body.iter_chunks(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    async def promote(self, ref: AvatarRef, version: int) -> AdapterManifest:
        """Make a kept version current, under the avatar's current-adapter lock: server-side copy
        of its files over the current ones, then the manifest, last. Raises VersionNotFound
        unless the version is complete (checked under the lock: a prune cannot take it away
        halfway), CurrentAdapterBusy when another change holds the lock too long."""
        async with self.current_lock(ref, owner=f"promote-{version}"):
            return await self._promote(ref, version)

    async def _promote(self, ref: AvatarRef, version: int) -> AdapterManifest:
        prefix = adapter_version_prefix(ref.user_id, ref.avatar_id, version)
        contents, _ = await self.objects.objects(prefix)
        present = {obj["Key"][len(prefix) :] for obj in contents}
        if not present >= {*ADAPTER_FILES, METRICS_FILE}:
            raise VersionNotFound(version)
        meta = await self._version_metrics(ref, version)
        if meta is None:
            raise VersionNotFound(version)

        # The trainer records each file's sha256 in metrics.json; hash any it did not.
        async def file_hash(name: str) -> str:
            return meta.files.get(name) or await self._sha256(prefix + name)

        hashes = dict(zip(ADAPTER_FILES, await asyncio.gather(*(file_hash(n) for n in ADAPTER_FILES)), strict=True))
        current = adapter_prefix(ref.user_id, ref.avatar_id)
        await asyncio.gather(
            *(
                self._s3.copy_object(
                    Bucket=self._bucket, Key=current + name, CopySource={"Bucket": self._bucket, "Key": prefix + name}
                )
                for name in ADAPTER_FILES
            )
        )
        manifest = AdapterManifest(
            current_version=version, job_id=meta.job_id, base_model=meta.base_model, files=hashes, metrics=meta.metrics
        )
        await self.objects.put(
            adapter_manifest_key(ref.user_id, ref.avatar_id), manifest.model_dump_json(by_alias=True).encode()
        )
        return manifest

    @asynccontextmanager
    async def current_lock(
        self, ref: AvatarRef, owner: str, wait: float = CURRENT_LOCK_WAIT_SECONDS
    ) -> AsyncIterator[None]:
        """Hold the avatar's current-adapter lock (`contracts.adapters.CurrentAdapterLock`) for
        the block; one whose holder died (expired) is taken over, and one this acquisition
        created itself (its answer lost) is held."""
        key = current_adapter_lock_key(ref.user_id, ref.avatar_id)
        token = CurrentAdapterLock.token(owner)
        deadline = time.monotonic() + wait
        while True:
            lock = CurrentAdapterLock(owner=token, expires_at=utcnow() + timedelta(seconds=CURRENT_LOCK_SECONDS))
            etag = await self.objects.create(key, lock.model_dump_json().encode())
            if etag is not None:
                break
            found = await self.objects.read(key)
            if found is not None:
                verdict = CurrentAdapterLock.verdict(found[0], token)
                if verdict == "ours":  # our create landed, its answer was lost
                    etag = found[1]
                    break
                if verdict == "expired":
                    await self.objects.delete_if(key, found[1])
                    continue
            if time.monotonic() > deadline:
                raise CurrentAdapterBusy(ref.avatar_id)
            await asyncio.sleep(0.2)
        try:
            yield
        finally:
            await self.objects.delete_if(key, etag)

    async def open_version_file(self, ref: AvatarRef, version: int, name: str) -> OpenedObject:
        """A version's file (one of VERSION_FILES): its GetObject response and body chunks.
        Raises VersionFileNotFound when the version or the file does not exist."""
        if name not in VERSION_FILES:
            raise VersionFileNotFound(name)
        opened = await open_object(self._s3, self._bucket, version_file_key(ref.user_id, ref.avatar_id, version, name))
        if opened is None:
            raise VersionFileNotFound(name)
        return opened

    # -- deletion ---------------------------------------------------------------------------

    async def delete(self, ref: AvatarRef) -> int:
        """Delete the configuration, the manifest, the current files, every version, every
        checkpoint, every merged model (`merged/`, fuse jobs), every fully fine-tuned model
        (`full/`, `method: full` jobs) and every export (`exports/`); never training data, job
        records or idempotency records. Returns how many objects were deleted (0: there was no
        adapter)."""
        async with self.current_lock(ref, owner="delete"):
            return await self._delete(ref)

    async def _delete(self, ref: AvatarRef) -> int:
        u, a = ref.user_id, ref.avatar_id
        root = adapter_prefix(u, a)
        wanted = {adapter_config_key(u, a), adapter_manifest_key(u, a), *(root + name for name in ADAPTER_FILES)}
        top, _ = await self.objects.objects(root, delimiter="/")
        versions, checkpoints, merged, full, exports = await asyncio.gather(
            self.objects.objects(adapter_versions_prefix(u, a)),
            self.objects.objects(checkpoints_prefix(u, a)),
            self.objects.objects(merged_prefix(u, a)),
            self.objects.objects(full_model_prefix(u, a)),
            self.objects.objects(exports_prefix(u, a)),
        )
        keys = [o["Key"] for o in top if o["Key"] in wanted]
        keys += [o["Key"] for o in versions[0] + checkpoints[0] + merged[0] + full[0] + exports[0]]
        # Manifests go first (the adapter's, then each merged or full model's and export's): from
        # then on no reader takes the files that remain for a complete adapter, model or export.
        model_roots = (merged_prefix(u, a), full_model_prefix(u, a), exports_prefix(u, a))
        manifest_names = {"/" + n for n in (MERGED_MANIFEST_FILE, FULL_MODEL_MANIFEST_FILE, EXPORT_MANIFEST_FILE)}
        manifests = [
            k
            for k in keys
            if k == adapter_manifest_key(u, a) or (k.startswith(model_roots) and k.endswith(tuple(manifest_names)))
        ]
        await delete_keys(self._s3, self._bucket, manifests, "adapter objects")
        await delete_keys(self._s3, self._bucket, [k for k in keys if k not in set(manifests)], "adapter objects")
        return len(keys)
