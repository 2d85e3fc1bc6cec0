"""Changes of the current adapter racing each other (API promotes, the trainer's publish and
prune): at rest the current files are always one whole version, the manifest names that version,
and the version it names still exists. Versions are written straight to S3 (distinct bytes per
version, as the trainer lays them out); the promotes go through the real API, the publishes
through the trainer's real ArtifactStore, at the same time."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

from contracts.keys import (
    ADAPTER_FILES,
    METRICS_FILE,
    adapter_manifest_key,
    adapter_prefix,
    adapter_version_prefix,
)
from tests.conftest import TEST_BUCKET, Api


def _files(version: int) -> dict[str, bytes]:
    return {name: f"{name} of version {version} ".encode() * 200 for name in ADAPTER_FILES}


def _write_version(s3, api: Api, version: int) -> None:
    prefix = adapter_version_prefix(api.user_id, api.avatar_id, version)
    files = _files(version)
    for name, data in files.items():
        s3.put_object(Bucket=TEST_BUCKET, Key=prefix + name, Body=data)
    meta = {
        "version": version,
        "job_id": f"job-{version}",
        "metrics": {},
        "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
    }
    s3.put_object(Bucket=TEST_BUCKET, Key=prefix + METRICS_FILE, Body=json.dumps(meta).encode())


def _assert_whole(s3, api: Api) -> int:
    manifest = json.loads(
        s3.get_object(Bucket=TEST_BUCKET, Key=adapter_manifest_key(api.user_id, api.avatar_id))["Body"].read()
    )
    version = manifest["current_version"]
    current = adapter_prefix(api.user_id, api.avatar_id)
    for name in ADAPTER_FILES:
        data = s3.get_object(Bucket=TEST_BUCKET, Key=current + name)["Body"].read()
        assert data == _files(version)[name], f"{name} is not version {version}'s"
        assert hashlib.sha256(data).hexdigest() == manifest["files"][name]
    kept = adapter_version_prefix(api.user_id, api.avatar_id, version) + METRICS_FILE
    s3.head_object(Bucket=TEST_BUCKET, Key=kept)  # the current version was not pruned
    return version


def test_concurrent_promotes_leave_one_whole_version(api: Api, stack) -> None:
    s3 = boto3.client("s3")
    for version in range(1, 5):
        _write_version(s3, api, version)
    for _ in range(15):
        with ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(lambda v: api.post(f"{api.base}/adapter/versions/{v}/promote").status_code, range(1, 5))
            )
        assert set(codes) <= {200, 409}, codes
        _assert_whole(s3, api)


def test_publish_and_prune_racing_promotes(api: Api, stack, tmp_path: Path) -> None:
    """The trainer publishes new versions (keeping 2) while the API promotes old ones: the
    current adapter is whole, and never a version the prune removed."""
    from trainer.artifacts import ArtifactStore

    s3 = boto3.client("s3")
    for version in (1, 2):
        _write_version(s3, api, version)
    assert api.post(f"{api.base}/adapter/versions/2/promote").status_code == 200
    store = ArtifactStore(s3, TEST_BUCKET)
    stop = threading.Event()

    def promote_loop() -> None:
        while not stop.is_set():
            versions = [v["version"] for v in api.get(f"{api.base}/adapter/versions").json()["items"]]
            for v in versions:
                assert api.post(f"{api.base}/adapter/versions/{v}/promote").status_code in (200, 404, 409)

    with ThreadPoolExecutor(1) as pool:
        promoting = pool.submit(promote_loop)
        try:
            for version in range(3, 11):
                adapter_dir = tmp_path / f"v{version}"
                adapter_dir.mkdir()
                for name, data in _files(version).items():
                    (adapter_dir / name).write_bytes(data)
                published = store.publish(
                    api.user_id,
                    api.avatar_id,
                    adapter_dir,
                    job_id=f"job-{version}",
                    base_model="tiny",
                    metrics={},
                    keep_versions=2,
                )
                assert published == version
        finally:
            stop.set()
            promoting.result()
    _assert_whole(s3, api)
