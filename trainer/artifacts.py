"""Adapter versions and checkpoints in S3.

Publishing a version writes `versions/{n}/` (adapter files, samples.json and loss.png, then
metrics.json), then, when the version is promoted, overwrites the current files in `adapters/`,
then `manifest.json` last: a reader that trusts the manifest never sees a half-written
adapter. The current adapter changes only under the avatar's current-adapter lock (with the
API's promote and delete; `contracts.adapters.CurrentAdapterLock`), so a publish, a promote and a
prune never interleave: at rest the current files are one whole version. Checkpoints follow
the same rule: files first, the `_COMPLETE` marker last, and only a marked checkpoint is ever
resumed from. So do merged models (`merged/{version}/`, fuse jobs) and exports
(`exports/{version}/{format}/`, export jobs): files first, their
`manifest.json` last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from contracts.adapters import AdapterManifest, ExportManifest, FullModelManifest, MergedManifest, VersionMetrics
from contracts.keys import (
    ADAPTER_FILES,
    CHECKPOINT_COMPLETE_MARKER,
    EXPORT_MANIFEST_FILE,
    FULL_MODEL_MANIFEST_FILE,
    MERGED_MANIFEST_FILE,
    METRICS_FILE,
    adapter_manifest_key,
    adapter_prefix,
    adapter_version_prefix,
    adapter_versions_prefix,
    checkpoint_prefix,
    export_prefix,
    full_model_prefix,
    full_model_version_prefix,
    merged_version_prefix,
)
from trainer.current_lock import current_adapter_lock
from trainer.s3_objects import S3Objects

log = logging.getLogger("avatune.trainer")

M = TypeVar("M", bound=BaseModel)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, s3: Any, bucket: str) -> None:
        self._s3 = s3
        self._bucket = bucket
        self._objects = S3Objects(s3, bucket)

    # -- helpers ----------------------------------------------------------------------------

    def _keys(self, prefix: str) -> list[str]:
        return self._objects.keys(prefix)

    def _delete_keys(self, keys: list[str]) -> None:
        self._objects.delete_keys(keys)

    def _tidy(self, keys: list[str], what: str) -> None:
        """Delete `keys` whose removal only saves space (a later pass removes them too): a
        refusal is logged, never a failure of the job that happens to be tidying."""
        try:
            self._delete_keys(keys)
        except RuntimeError as exc:
            log.warning("%s left for a later pass: %s", what, exc)

    def _child_numbers(self, prefix: str) -> list[int]:
        return self._objects.child_numbers(prefix)

    def _put_json(self, key: str, body: str) -> None:
        self._objects.put(key, body.encode())

    def _claim(self, key: str, job_id: str) -> bool:
        """Claim a version number (a `.claim` object, If-None-Match): False when taken."""
        return self._objects.create(key, json.dumps({"job_id": job_id}).encode()) is not None

    # -- adapter versions -------------------------------------------------------------------

    def versions(self, user_id: str, avatar_id: str) -> list[int]:
        return self._child_numbers(adapter_versions_prefix(user_id, avatar_id))

    def _get_model(self, key: str, model: type[M]) -> M | None:
        """The JSON object at `key` as `model`, or None when there is none."""
        return self._objects.read_model(key, model)

    def current_manifest(self, user_id: str, avatar_id: str) -> AdapterManifest | None:
        return self._get_model(adapter_manifest_key(user_id, avatar_id), AdapterManifest)

    def version_metrics(self, user_id: str, avatar_id: str, version: int) -> VersionMetrics | None:
        """A version's metrics.json (written after its files), or None: no such complete version."""
        return self._get_model(adapter_version_prefix(user_id, avatar_id, version) + METRICS_FILE, VersionMetrics)

    def download_version(self, user_id: str, avatar_id: str, version: int, dest: Path) -> VersionMetrics | None:
        """Download a kept version's adapter files into `dest`; its metrics, or None when the
        version does not exist or is incomplete."""
        meta = self.version_metrics(user_id, avatar_id, version)
        if meta is None:
            return None
        prefix = adapter_version_prefix(user_id, avatar_id, version)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            if not self._objects.download(prefix + name, str(dest / name)):  # pruned or deleted meanwhile
                return None
        return meta

    def version_of_job(self, user_id: str, avatar_id: str, job_id: str) -> int | None:
        """The version a job already published (a retried job must not publish twice)."""
        for version in reversed(self.versions(user_id, avatar_id)):
            meta = self.version_metrics(user_id, avatar_id, version)
            if meta is not None and meta.job_id == job_id:
                return version
        return None

    def download_current(self, user_id: str, avatar_id: str, dest: Path) -> AdapterManifest | None:
        """Download the current adapter files into `dest`; their manifest, or None when the
        avatar has no adapter (or it was deleted meanwhile)."""
        manifest = self.current_manifest(user_id, avatar_id)
        if manifest is None:
            return None
        prefix = adapter_prefix(user_id, avatar_id)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            if not self._objects.download(prefix + name, str(dest / name)):
                return None
        return manifest

    def publish(
        self,
        user_id: str,
        avatar_id: str,
        adapter_dir: Path,
        *,
        job_id: str,
        base_model: str,
        metrics: dict[str, Any],
        keep_versions: int,
        extra_files: dict[str, Path] | None = None,
        promote: bool = True,
    ) -> int:
        """Store the adapter in `adapter_dir` as the next version, with `extra_files` (samples.json,
        loss.png) beside it, and make it current unless `promote` is False (then it is kept
        under versions/{n}/ to be promoted later, and the current adapter stays)."""
        extra = dict(extra_files or {})
        if {METRICS_FILE, ".claim", *ADAPTER_FILES} & set(extra) or any("/" in name for name in extra):
            raise ValueError(f"extra files may not replace a version's own files: {sorted(extra)}")
        files = {name: adapter_dir / name for name in ADAPTER_FILES}
        hashes = {name: sha256_file(path) for name, path in files.items()}
        while True:
            version = (max(self.versions(user_id, avatar_id), default=0)) + 1
            prefix = adapter_version_prefix(user_id, avatar_id, version)
            # Claim the version number: a concurrent publisher gets 412 and takes the next one.
            if self._claim(prefix + ".claim", job_id):
                break
        for name, path in files.items():
            self._s3.upload_file(str(path), self._bucket, prefix + name)
        for name, path in extra.items():  # before metrics.json, which marks the version complete
            self._s3.upload_file(str(path), self._bucket, prefix + name, ExtraArgs={"ContentType": _content_type(name)})
        meta = VersionMetrics(version=version, job_id=job_id, base_model=base_model, metrics=metrics)
        self._put_json(prefix + METRICS_FILE, _with_files(meta, hashes))
        with current_adapter_lock(self._objects, user_id, avatar_id, owner=job_id):
            if promote:
                self.make_current(
                    user_id,
                    avatar_id,
                    version,
                    job_id=job_id,
                    base_model=base_model,
                    metrics=metrics,
                    hashes=hashes,
                    source_dir=adapter_dir,
                )
            self.prune(user_id, avatar_id, keep_versions, protect=version)
        return version

    def finish_promotion(self, user_id: str, avatar_id: str, version: int) -> VersionMetrics | None:
        """For a retried job whose version is already published: complete its promotion if the
        earlier attempt stopped between metrics.json and the manifest. Returns the version's
        stored metrics (the outcome that stands), or None when it is gone."""
        meta = self.version_metrics(user_id, avatar_id, version)
        if meta is None or not meta.metrics.get("promoted", True):
            return meta
        with current_adapter_lock(self._objects, user_id, avatar_id, owner=meta.job_id or "retry"):
            return self._promote_once(user_id, avatar_id, version, meta)

    def _promote_once(self, user_id: str, avatar_id: str, version: int, meta: VersionMetrics) -> VersionMetrics:
        manifest = self.current_manifest(user_id, avatar_id)
        if manifest is not None and (manifest.job_id == meta.job_id or manifest.current_version >= version):
            return meta  # promoted already, or a newer version is current by now
        prefix, current = adapter_version_prefix(user_id, avatar_id, version), adapter_prefix(user_id, avatar_id)
        for name in ADAPTER_FILES:
            self._s3.copy_object(
                Bucket=self._bucket, Key=current + name, CopySource={"Bucket": self._bucket, "Key": prefix + name}
            )
        promoted = AdapterManifest(
            current_version=version,
            job_id=meta.job_id,
            base_model=meta.base_model,
            files=meta.files,
            metrics=meta.metrics,
        )
        self._put_json(adapter_manifest_key(user_id, avatar_id), promoted.model_dump_json(by_alias=True))
        log.info("version %d of job %s promoted on retry", version, meta.job_id)
        return meta

    def make_current(
        self,
        user_id: str,
        avatar_id: str,
        version: int,
        *,
        job_id: str | None,
        base_model: str | None,
        metrics: dict[str, Any],
        hashes: dict[str, str],
        source_dir: Path,
    ) -> None:
        current = adapter_prefix(user_id, avatar_id)
        for name in ADAPTER_FILES:
            self._s3.upload_file(str(source_dir / name), self._bucket, current + name)
        manifest = AdapterManifest(
            current_version=version, job_id=job_id, base_model=base_model, files=hashes, metrics=metrics
        )
        self._put_json(adapter_manifest_key(user_id, avatar_id), manifest.model_dump_json(by_alias=True))

    def prune(self, user_id: str, avatar_id: str, keep: int, protect: int) -> None:
        """Delete all but the newest `keep` versions; never the current one. Called under the
        current-adapter lock, so no promotion of a version it deletes is under way."""
        manifest = self.current_manifest(user_id, avatar_id)
        protected = {protect} | ({manifest.current_version} if manifest else set())
        versions = self.versions(user_id, avatar_id)
        for version in versions[: max(0, len(versions) - keep)]:
            if version not in protected:
                self._tidy(self._keys(adapter_version_prefix(user_id, avatar_id, version)), f"pruned version {version}")

    # -- merged models (fuse jobs) ----------------------------------------------------------

    def merged_manifest(self, user_id: str, avatar_id: str, version: int) -> MergedManifest | None:
        """The manifest of version `version` merged, or None while there is no complete one."""
        return self._get_model(
            merged_version_prefix(user_id, avatar_id, version) + MERGED_MANIFEST_FILE, MergedManifest
        )

    def publish_merged(self, user_id: str, avatar_id: str, model_dir: Path, manifest: MergedManifest) -> MergedManifest:
        """Upload the merged model in `model_dir` to `merged/{version}/`, `manifest.json` last.

        A model merged before under the same version is replaced: its manifest goes first (so
        no reader trusts a mix of old and new files), files the new model lacks go before the
        new manifest is written. Returns the manifest written (with every file's sha256)."""
        prefix = merged_version_prefix(user_id, avatar_id, manifest.adapter_version)
        return self._replace_under(prefix, model_dir, MERGED_MANIFEST_FILE, manifest)

    def _replace_under(self, prefix: str, local_dir: Path, manifest_file: str, manifest: M) -> M:
        """Upload `local_dir` under `prefix`, `manifest_file` last (its `files`: each file's sha256),
        replacing what was there: the old manifest goes first, files the new upload lacks go before
        the new manifest is written. Returns the manifest written."""
        files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
        if manifest_file in files:
            raise ValueError(f"the files to upload may not carry their own {manifest_file}")
        manifest = manifest.model_copy(update={"files": {name: sha256_file(path) for name, path in files.items()}})
        self._s3.delete_object(Bucket=self._bucket, Key=prefix + manifest_file)
        for name, path in files.items():
            self._s3.upload_file(str(path), self._bucket, prefix + name)
        self._delete_keys([k for k in self._keys(prefix) if k[len(prefix) :] not in files])
        self._put_json(prefix + manifest_file, manifest.model_dump_json(by_alias=True))
        return manifest

    # -- full fine-tunes (method full) -----------------------------------------------------

    def full_manifest(self, user_id: str, avatar_id: str, version: int) -> FullModelManifest | None:
        return self._get_model(
            full_model_version_prefix(user_id, avatar_id, version) + FULL_MODEL_MANIFEST_FILE, FullModelManifest
        )

    def full_version_of_job(self, user_id: str, avatar_id: str, job_id: str) -> int | None:
        """The full-model version a job already published (a retried job must not publish twice)."""
        for version in reversed(self._child_numbers(full_model_prefix(user_id, avatar_id))):
            manifest = self.full_manifest(user_id, avatar_id, version)
            if manifest is not None and manifest.job_id == job_id:
                return version
        return None

    def publish_full(
        self, user_id: str, avatar_id: str, model_dir: Path, manifest: FullModelManifest
    ) -> FullModelManifest:
        """Upload a whole model to the next `full/{version}/` (claimed like adapter versions), its
        `manifest.json` last; returns the manifest written (version and files' sha256 filled in)."""
        files = {p.relative_to(model_dir).as_posix(): p for p in sorted(model_dir.rglob("*")) if p.is_file()}
        if FULL_MODEL_MANIFEST_FILE in files:
            raise ValueError(f"a saved model may not carry its own {FULL_MODEL_MANIFEST_FILE}")
        while True:
            version = max(self._child_numbers(full_model_prefix(user_id, avatar_id)), default=0) + 1
            prefix = full_model_version_prefix(user_id, avatar_id, version)
            if self._claim(prefix + ".claim", manifest.job_id):  # a concurrent publisher takes the next number
                break
        manifest = manifest.model_copy(
            update={"version": version, "files": {name: sha256_file(path) for name, path in files.items()}}
        )
        for name, path in files.items():
            self._s3.upload_file(str(path), self._bucket, prefix + name)
        self._put_json(prefix + FULL_MODEL_MANIFEST_FILE, manifest.model_dump_json(by_alias=True))
        return manifest

    # -- exports (export jobs) ----------------------------------------------------------------

    def export_manifest(self, user_id: str, avatar_id: str, version: int, export_format: str) -> ExportManifest | None:
        """The manifest of version `version` exported as `export_format`; None while there is no complete one."""
        return self._get_model(
            export_prefix(user_id, avatar_id, version, export_format) + EXPORT_MANIFEST_FILE, ExportManifest
        )

    def publish_export(self, user_id: str, avatar_id: str, out_dir: Path, manifest: ExportManifest) -> ExportManifest:
        """Upload the files in `out_dir` to `exports/{version}/{format}/`, `manifest.json` last,
        replacing an earlier export of the same version and format as `publish_merged` does."""
        prefix = export_prefix(user_id, avatar_id, manifest.adapter_version, manifest.format)
        return self._replace_under(prefix, out_dir, EXPORT_MANIFEST_FILE, manifest)

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, user_id: str, avatar_id: str, job_id: str, local_dir: Path, step: int) -> None:
        """Upload a checkpoint directory; the marker goes last, then older checkpoints go."""
        base = checkpoint_prefix(user_id, avatar_id, job_id)
        prefix = f"{base}{step:09d}/"
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self._s3.upload_file(str(path), self._bucket, prefix + path.relative_to(local_dir).as_posix())
        self._put_json(prefix + CHECKPOINT_COMPLETE_MARKER, json.dumps({"step": step}))
        older = [k for k in self._keys(base) if not k.startswith(prefix)]
        self._tidy(older, "older checkpoints")  # the job's tail deletes them all in the end
        log.info("checkpoint job=%s step=%d uploaded", job_id, step)

    def latest_checkpoint(self, user_id: str, avatar_id: str, job_id: str) -> int | None:
        """The newest step whose checkpoint is complete (has its marker)."""
        base = checkpoint_prefix(user_id, avatar_id, job_id)
        keys = set(self._keys(base))
        complete = [
            int(k[len(base) :].split("/")[0])
            for k in keys
            if k.endswith("/" + CHECKPOINT_COMPLETE_MARKER) and k[len(base) :].split("/")[0].isdigit()
        ]
        return max(complete, default=None)

    def download_checkpoint(self, user_id: str, avatar_id: str, job_id: str, step: int, dest: Path) -> Path:
        prefix = f"{checkpoint_prefix(user_id, avatar_id, job_id)}{step:09d}/"
        for key in self._keys(prefix):
            rel = key[len(prefix) :]
            if rel == CHECKPOINT_COMPLETE_MARKER:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self._s3.download_file(self._bucket, key, str(target))
        return dest

    def delete_checkpoints(self, user_id: str, avatar_id: str, job_id: str) -> None:
        self._delete_keys(self._keys(checkpoint_prefix(user_id, avatar_id, job_id)))


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _with_files(meta: VersionMetrics, hashes: dict[str, str]) -> str:
    data = json.loads(meta.model_dump_json())
    data["files"] = hashes
    return json.dumps(data)
