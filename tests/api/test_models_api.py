"""`GET {base}/merged-models[/{n}]` and `GET {base}/full-models[/{n}]` over real HTTP against
moto: the tests play the trainer by writing model files and manifests into S3 (a real fuse
job's files are fetched through these routes in test_fuse.py)."""

from __future__ import annotations

import hashlib
import uuid

import httpx
import pytest

from contracts.adapters import FullModelManifest, MergedManifest
from contracts.keys import (
    FULL_MODEL_MANIFEST_FILE,
    MERGED_MANIFEST_FILE,
    full_model_version_prefix,
    merged_version_prefix,
)
from tests.conftest import TEST_BUCKET, Api


def write_model(s3, prefix: str, manifest_file: str, manifest, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        s3.put_object(Bucket=TEST_BUCKET, Key=prefix + name, Body=data)
    s3.put_object(Bucket=TEST_BUCKET, Key=prefix + manifest_file, Body=manifest.model_dump_json(by_alias=True))


def files_of(n: int) -> dict[str, bytes]:
    return {"config.json": b'{"n": %d}' % n, "model.safetensors": uuid.uuid4().bytes * 100, "tokenizer.json": b"{}"}


def merged(s3, api: Api, version: int, files: dict[str, bytes]) -> MergedManifest:
    manifest = MergedManifest(
        adapter_version=version,
        job_id=f"job-fuse-{version}",
        base_model="tiny",
        dtype="bfloat16",
        files={n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
    )
    write_model(s3, merged_version_prefix(api.user_id, api.avatar_id, version), MERGED_MANIFEST_FILE, manifest, files)
    return manifest


def test_merged_models_are_listed_and_handed_out_by_presigned_url(api: Api, s3) -> None:
    assert api.get(f"{api.base}/merged-models").json() == {"items": []}
    first, third = files_of(1), files_of(3)
    merged(s3, api, 3, third)
    merged(s3, api, 1, first)
    # A model still uploading (files, no manifest yet) is not there.
    s3.put_object(
        Bucket=TEST_BUCKET, Key=merged_version_prefix(api.user_id, api.avatar_id, 2) + "config.json", Body=b"{}"
    )

    items = api.get(f"{api.base}/merged-models").json()["items"]
    assert [(i["version"], i["job_id"], i["dtype"], i["base_model"]) for i in items] == [
        (1, "job-fuse-1", "bfloat16", "tiny"),
        (3, "job-fuse-3", "bfloat16", "tiny"),
    ]

    r = api.get(f"{api.base}/merged-models/3")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["version"] == 3 and view["prefix"] == merged_version_prefix(api.user_id, api.avatar_id, 3)
    assert [f["name"] for f in view["files"]] == sorted(third)
    for f in view["files"]:  # each URL downloads the file the manifest names, no token needed
        data = httpx.get(f["url"]).content
        assert data == third[f["name"]] and hashlib.sha256(data).hexdigest() == f["sha256"]

    for missing in ("2", "4"):
        r = api.get(f"{api.base}/merged-models/{missing}")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        assert f"no merged model {missing}" in r.json()["detail"]
    for bad in ("0", "-1", "abc", "1.5", "99999999"):
        assert api.get(f"{api.base}/merged-models/{bad}").status_code == 422
    for other in ("other-models", "other-models/1", "-models"):  # only merged and full
        r = api.get(f"{api.base}/{other}")
        assert r.status_code in (404, 422) and r.headers["content-type"] == "application/problem+json", r.text


def test_full_models_carry_their_metrics(api: Api, s3) -> None:
    files = files_of(1)
    manifest = FullModelManifest(
        version=1,
        job_id="job-full",
        base_model="tiny",
        precision="bf16",
        dtype="bfloat16",
        trainable_layers=[1],
        metrics={"eval_loss_after": 1.5},
        files={n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
    )
    write_model(s3, full_model_version_prefix(api.user_id, api.avatar_id, 1), FULL_MODEL_MANIFEST_FILE, manifest, files)
    (item,) = api.get(f"{api.base}/full-models").json()["items"]
    assert (item["version"], item["job_id"], item["metrics"]) == (1, "job-full", {"eval_loss_after": 1.5})
    view = api.get(f"{api.base}/full-models/1").json()
    assert {f["name"]: httpx.get(f["url"]).content for f in view["files"]} == files
    assert api.get(f"{api.base}/full-models/2").status_code == 404
    assert api.get(f"{api.base}/merged-models").json() == {"items": []}  # kinds are apart


@pytest.mark.parametrize("route", ["merged-models", "full-models"])
def test_another_avatars_models_are_not_listed(api_url: str, api: Api, s3, route: str) -> None:
    merged(s3, api, 1, files_of(1))
    with Api(api_url, api.user_id, "other-avatar") as other:
        assert other.get(f"{other.base}/{route}").json() == {"items": []}
        assert other.get(f"{other.base}/{route}/1").status_code == 404
