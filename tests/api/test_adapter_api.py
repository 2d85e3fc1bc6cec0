"""The adapter API (configuration, current files, versions, promote, delete) over real HTTP
against moto in server mode. Versions are written straight into S3, as the trainer would."""

from __future__ import annotations

import hashlib
import json
import uuid

import httpx
import pytest

from contracts.adapter import DOCUMENTED_DEFAULTS
from contracts.adapters import AdapterManifest, VersionMetrics
from contracts.jobs import JobRecord
from contracts.keys import (
    ADAPTER_FILES,
    METRICS_FILE,
    adapter_config_key,
    adapter_manifest_key,
    adapter_prefix,
    adapter_version_prefix,
    checkpoint_prefix,
    idempotency_key,
    job_key,
    training_data_prefix,
    user_prefix,
)
from tests.conftest import TEST_BUCKET, Api, chat_line, keys_under

DEFAULTS = DOCUMENTED_DEFAULTS.model_dump()


def file_bytes(version: int) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps({"r": 8, "version": version}).encode(),
        "adapter_model.safetensors": f"weights of version {version} ".encode() * 100,
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_version(s3, api: Api, version: int, *, metrics: bool = True, hashes: bool = True) -> dict[str, bytes]:
    """What the trainer writes for a version: the files, then metrics.json (with the hashes)."""
    prefix = adapter_version_prefix(api.user_id, api.avatar_id, version)
    files = file_bytes(version)
    for name, data in files.items():
        s3.put_object(Bucket=TEST_BUCKET, Key=prefix + name, Body=data)
    if metrics:
        meta = VersionMetrics(
            version=version,
            job_id=f"job-v{version}",
            base_model="tiny",
            metrics={"eval_loss": 1.0 / version},
            files={n: sha(d) for n, d in files.items()} if hashes else {},
        )
        s3.put_object(Bucket=TEST_BUCKET, Key=prefix + METRICS_FILE, Body=meta.model_dump_json())
    return files


def make_current(s3, api: Api, version: int) -> dict[str, bytes]:
    """What the trainer does after a version: overwrite the current files, then the manifest."""
    files = file_bytes(version)
    for name, data in files.items():
        s3.put_object(Bucket=TEST_BUCKET, Key=adapter_prefix(api.user_id, api.avatar_id) + name, Body=data)
    manifest = AdapterManifest(
        current_version=version,
        job_id=f"job-v{version}",
        base_model="tiny",
        files={n: sha(d) for n, d in files.items()},
        metrics={"eval_loss": 1.0 / version},
    )
    s3.put_object(
        Bucket=TEST_BUCKET,
        Key=adapter_manifest_key(api.user_id, api.avatar_id),
        Body=manifest.model_dump_json(by_alias=True),
    )
    return files


def current_files(s3, api: Api) -> dict[str, bytes]:
    prefix = adapter_prefix(api.user_id, api.avatar_id)
    return {n: s3.get_object(Bucket=TEST_BUCKET, Key=prefix + n)["Body"].read() for n in ADAPTER_FILES}


def stored_manifest(s3, api: Api) -> AdapterManifest:
    body = s3.get_object(Bucket=TEST_BUCKET, Key=adapter_manifest_key(api.user_id, api.avatar_id))["Body"].read()
    return AdapterManifest.model_validate_json(body)


def stored_config(s3, api: Api) -> dict:
    return json.loads(
        s3.get_object(Bucket=TEST_BUCKET, Key=adapter_config_key(api.user_id, api.avatar_id))["Body"].read()
    )


@pytest.fixture
def two_versions(api: Api, s3) -> dict[int, dict[str, bytes]]:
    """versions/1 and versions/2 complete, version 2 current."""
    files = {1: write_version(s3, api, 1), 2: write_version(s3, api, 2)}
    make_current(s3, api, 2)
    return files


# -- configuration ---------------------------------------------------------------------------


def test_get_is_404_before_anything_exists(api: Api) -> None:
    r = api.get(f"{api.base}/adapter")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert api.get(f"{api.base}/adapter/versions").json() == {"items": []}


def test_put_merges_over_stored_config_and_get_shows_defaults(api: Api, s3) -> None:
    r = api.put(f"{api.base}/adapter", json={"r": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"config", "current_version", "metrics", "updated_at", "files"}
    assert body["config"] == {**DEFAULTS, "r": 8}
    assert (body["current_version"], body["metrics"], body["updated_at"], body["files"]) == (None, {}, None, [])
    assert stored_config(s3, api) == {"r": 8}

    r = api.put(
        f"{api.base}/adapter", json={"lora_alpha": 64, "target_modules": ["q_proj", "v_proj"], "method": "lora"}
    )
    assert r.status_code == 200, r.text
    expected = {**DEFAULTS, "r": 8, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"], "method": "lora"}
    assert r.json()["config"] == expected
    assert stored_config(s3, api) == {
        "r": 8,
        "lora_alpha": 64,
        "target_modules": ["q_proj", "v_proj"],
        "method": "lora",
    }
    assert api.get(f"{api.base}/adapter").json()["config"] == expected
    # An empty object changes nothing.
    assert api.put(f"{api.base}/adapter", json={}).json()["config"] == expected
    # null resets a field to its default; the others stay.
    r = api.put(f"{api.base}/adapter", json={"target_modules": None, "r": None, "lora_alpha": 32})
    assert r.status_code == 200, r.text
    assert r.json()["config"] == {**DEFAULTS, "lora_alpha": 32, "method": "lora"}
    assert stored_config(s3, api) == {"lora_alpha": 32, "method": "lora"}


@pytest.mark.parametrize(
    "body",
    [
        {"r": 0},
        {"r": 257},
        {"lora_dropout": 1},
        {"unknown": 1},
        {"target_modules": ["q/proj"]},
        {"target_modules": []},
        {"method": "sgd"},
        {"learning_rate": "fast"},
    ],
    ids=lambda b: json.dumps(b),
)
def test_put_refuses_invalid_config(api: Api, s3, body: dict) -> None:
    r = api.put(f"{api.base}/adapter", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["errors"]
    assert keys_under(s3, adapter_prefix(api.user_id, api.avatar_id)) == []


def test_put_refuses_non_object_bodies(api: Api, s3) -> None:
    for kwargs in ({"content": b"not json", "headers": {"content-type": "application/json"}}, {"json": [1]}, {}):
        r = api.put(f"{api.base}/adapter", **kwargs)
        assert r.status_code == 422, kwargs
        assert r.headers["content-type"] == "application/problem+json"
    assert keys_under(s3, adapter_prefix(api.user_id, api.avatar_id)) == []


# -- current adapter and versions ------------------------------------------------------------


def test_get_shows_current_version_with_downloadable_files(api: Api, two_versions) -> None:
    api.put(f"{api.base}/adapter", json={"r": 4})
    body = api.get(f"{api.base}/adapter").json()
    assert body["current_version"] == 2 and body["metrics"] == {"eval_loss": 0.5}
    assert body["updated_at"] and body["config"]["r"] == 4
    assert [f["name"] for f in body["files"]] == list(ADAPTER_FILES)
    for f in body["files"]:
        assert f["sha256"] == sha(two_versions[2][f["name"]])
        assert "X-Amz-Signature" in f["url"] and "X-Amz-Expires=900" in f["url"]
        download = httpx.get(f["url"])
        assert download.status_code == 200 and download.content == two_versions[2][f["name"]]


def test_versions_listing_skips_half_written_versions(api: Api, s3, two_versions) -> None:
    write_version(s3, api, 3, metrics=False)  # the trainer is still uploading version 3
    r = api.get(f"{api.base}/adapter/versions")
    assert r.status_code == 200
    items = r.json()["items"]
    assert [(v["version"], v["job_id"], v["metrics"]) for v in items] == [
        (1, "job-v1", {"eval_loss": 1.0}),
        (2, "job-v2", {"eval_loss": 0.5}),
    ]
    assert all(set(v) == {"version", "created_at", "job_id", "metrics"} for v in items)


def test_versions_sort_numerically(api: Api, s3) -> None:
    for n in (10, 2, 1):
        write_version(s3, api, n)
    assert [v["version"] for v in api.get(f"{api.base}/adapter/versions").json()["items"]] == [1, 2, 10]


def test_promote_rewrites_current_files_then_manifest(api: Api, s3, two_versions) -> None:
    assert current_files(s3, api) == two_versions[2]
    r = api.post(f"{api.base}/adapter/versions/1/promote")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["current_version"] == 1 and body["metrics"] == {"eval_loss": 1.0}
    assert {f["name"]: f["sha256"] for f in body["files"]} == {n: sha(d) for n, d in two_versions[1].items()}
    assert current_files(s3, api) == two_versions[1]
    manifest = stored_manifest(s3, api)
    assert (manifest.current_version, manifest.job_id, manifest.base_model) == (1, "job-v1", "tiny")
    assert manifest.files == {n: sha(d) for n, d in two_versions[1].items()}
    assert api.get(f"{api.base}/adapter").json()["current_version"] == 1
    # ... and back again; the versions themselves are untouched.
    assert api.post(f"{api.base}/adapter/versions/2/promote").json()["current_version"] == 2
    assert current_files(s3, api) == two_versions[2]
    assert [v["version"] for v in api.get(f"{api.base}/adapter/versions").json()["items"]] == [1, 2]


def test_promote_hashes_files_when_metrics_lack_them(api: Api, s3) -> None:
    files = write_version(s3, api, 1, hashes=False)
    r = api.post(f"{api.base}/adapter/versions/1/promote")
    assert r.status_code == 200, r.text
    assert stored_manifest(s3, api).files == {n: sha(d) for n, d in files.items()}


def test_promote_refuses_missing_or_incomplete_versions(api: Api, s3, two_versions) -> None:
    write_version(s3, api, 3, metrics=False)  # half written
    s3.delete_object(Bucket=TEST_BUCKET, Key=adapter_version_prefix(api.user_id, api.avatar_id, 1) + ADAPTER_FILES[1])
    for version in (9, 3, 1):
        r = api.post(f"{api.base}/adapter/versions/{version}/promote")
        assert r.status_code == 404, (version, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    for bad in ("0", "-1", "one", "1.5"):
        assert api.post(f"{api.base}/adapter/versions/{bad}/promote").status_code == 422, bad
    assert current_files(s3, api) == two_versions[2] and stored_manifest(s3, api).current_version == 2


# -- delete ----------------------------------------------------------------------------------


def test_delete_removes_exactly_the_adapter(api: Api, s3, two_versions) -> None:
    u, a = api.user_id, api.avatar_id
    assert api.put_doc("chat.jsonl", chat_line("hi", "hello")).status_code == 201
    assert api.put_doc("unused.txt", b"x", flag=False).status_code == 201
    api.put(f"{api.base}/adapter", json={"r": 4})
    ckpt = checkpoint_prefix(u, a, "job-old") + "000000010/adapter_model.safetensors"
    s3.put_object(Bucket=TEST_BUCKET, Key=ckpt, Body=b"ckpt")
    finished = JobRecord(id="job-old", user_id=u, avatar_id=a, status="succeeded")
    s3.put_object(Bucket=TEST_BUCKET, Key=job_key(u, a, "job-old"), Body=finished.to_json())
    idem = idempotency_key(u, a, "0" * 64)
    s3.put_object(Bucket=TEST_BUCKET, Key=idem, Body=b'{"job_id": "job-old"}')
    reserved = [f"users/{u}/avatars/{a}/media/photo.png", f"users/{u}/avatars/{a}/vectorstore_data/x.bin"]
    for key in reserved:
        s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=b"keep")

    r = api.delete(f"{api.base}/adapter")
    assert r.status_code == 204, r.text
    data = training_data_prefix(u, a)
    assert sorted(keys_under(s3, user_prefix(u))) == sorted(
        [data + "chat.jsonl", data + "unused.txt", job_key(u, a, "job-old"), idem, *reserved]
    )
    assert api.get(f"{api.base}/adapter").status_code == 404
    assert api.get(f"{api.base}/adapter/versions").json() == {"items": []}
    assert api.delete(f"{api.base}/adapter").status_code == 404
    # The history survives.
    assert [j["id"] for j in api.get(f"{api.base}/training-jobs").json()["items"]] == ["job-old"]


def test_delete_of_config_only_adapter(api: Api, s3) -> None:
    api.put(f"{api.base}/adapter", json={"r": 4})
    assert api.delete(f"{api.base}/adapter").status_code == 204
    assert keys_under(s3, adapter_prefix(api.user_id, api.avatar_id)) == []


def test_delete_is_refused_while_a_job_is_active(api: Api, s3, two_versions) -> None:
    api.put_doc("chat.jsonl", chat_line("hi", "hello"))
    job = api.post(f"{api.base}/training-jobs")
    assert job.status_code == 202, job.text
    before = keys_under(s3, adapter_prefix(api.user_id, api.avatar_id))
    r = api.delete(f"{api.base}/adapter")
    assert r.status_code == 409 and r.json()["active_job_id"] == job.json()["id"]
    assert job.json()["id"] in r.json()["detail"]
    assert keys_under(s3, adapter_prefix(api.user_id, api.avatar_id)) == before
    assert api.post(f"{api.base}/training-jobs/{job.json()['id']}/cancel").status_code == 202
    assert api.delete(f"{api.base}/adapter").status_code == 204


# -- the user's adapters ---------------------------------------------------------------------


def test_user_adapters_lists_avatars_with_a_manifest(api_url: str, s3) -> None:
    user = "u-" + uuid.uuid4().hex[:12]
    with (
        Api(api_url, user, "b-avatar") as b,
        Api(api_url, user, "a-avatar") as a,
        Api(api_url, user, "c-config-only") as c,
        Api(api_url, user, "d-docs-only") as d,
    ):
        make_current(s3, b, 3)
        make_current(s3, a, 1)
        c.put(f"{c.base}/adapter", json={"r": 4})
        d.put_doc("x.txt", b"text")
        r = a.get(f"/v1/users/{user}/adapters")
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert [(i["avatar_id"], i["current_version"]) for i in items] == [("a-avatar", 1), ("b-avatar", 3)]
        assert all(set(i) == {"avatar_id", "current_version", "updated_at"} for i in items)


def test_user_adapters_of_new_user_is_empty(api: Api) -> None:
    assert api.get(f"/v1/users/{api.user_id}/adapters").json() == {"items": []}


# -- tenant isolation ------------------------------------------------------------------------

ROUTES = [
    ("GET", "{base}/adapter", {}),
    ("PUT", "{base}/adapter", {"json": {"r": 4}}),
    ("DELETE", "{base}/adapter", {}),
    ("GET", "{base}/adapter/versions", {}),
    ("POST", "{base}/adapter/versions/1/promote", {}),
    ("GET", "/v1/users/{user}/adapters", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_other_users_token_is_forbidden(api: Api, api_url: str, s3, method, path, kwargs) -> None:
    with Api(api_url, "victim-" + uuid.uuid4().hex[:8], "av") as victim:
        write_version(s3, victim, 1)
        make_current(s3, victim, 1)
        victim.put(f"{victim.base}/adapter", json={"r": 2})
        before = keys_under(s3, user_prefix(victim.user_id))
        url = path.format(base=victim.base, user=victim.user_id)
        r = api.request(method, url, **kwargs)
        assert r.status_code == 403, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert keys_under(s3, user_prefix(victim.user_id)) == before
        assert stored_config(s3, victim) == {"r": 2}
        r = httpx.request(method, api_url + url, **kwargs)
        assert r.status_code == 401
