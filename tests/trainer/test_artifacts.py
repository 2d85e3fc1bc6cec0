"""Adapter versions and checkpoints in S3 (moto server, real boto3)."""

from __future__ import annotations

import json
import uuid

from contracts.keys import adapter_manifest_key, adapter_prefix, checkpoint_prefix
from tests.conftest import TEST_BUCKET, adapter_dir, keys_under
from trainer.artifacts import ArtifactStore


def test_publish_keeps_the_newest_versions_and_writes_the_manifest_last(s3, tmp_path) -> None:
    user, avatar = "art-" + uuid.uuid4().hex[:8], "a"
    store = ArtifactStore(s3, TEST_BUCKET)
    for n in range(1, 6):
        version = store.publish(
            user,
            avatar,
            adapter_dir(tmp_path, n),
            job_id=f"job-{n}",
            base_model="tiny",
            metrics={"n": n},
            keep_versions=2,
        )
        assert version == n
    assert store.versions(user, avatar) == [4, 5]
    current = s3.get_object(Bucket=TEST_BUCKET, Key=adapter_prefix(user, avatar) + "adapter_model.safetensors")
    assert current["Body"].read() == bytes([5]) * 64
    manifest = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=adapter_manifest_key(user, avatar))["Body"].read())
    assert manifest["current_version"] == 5 and manifest["job_id"] == "job-5"
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    # A retried job finds the version it already published instead of publishing again.
    assert store.version_of_job(user, avatar, "job-5") == 5
    assert store.version_of_job(user, avatar, "job-9") is None


def test_only_complete_checkpoints_are_resumed(s3, tmp_path) -> None:
    user, avatar, job = "ck-" + uuid.uuid4().hex[:8], "a", "job-1"
    store = ArtifactStore(s3, TEST_BUCKET)
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"w" * 32)
    (ckpt / "trainer_state.json").write_text("{}")
    store.save_checkpoint(user, avatar, job, ckpt, 10)
    # A later upload that died before its marker (preempted mid-upload) is never resumed from.
    s3.put_object(
        Bucket=TEST_BUCKET, Key=checkpoint_prefix(user, avatar, job) + "000000020/trainer_state.json", Body=b"{}"
    )
    assert store.latest_checkpoint(user, avatar, job) == 10
    restored = store.download_checkpoint(user, avatar, job, 10, tmp_path / "restored")
    assert (restored / "adapter_model.safetensors").read_bytes() == b"w" * 32
    assert not (restored / "_COMPLETE").exists()
    store.delete_checkpoints(user, avatar, job)
    assert keys_under(s3, checkpoint_prefix(user, avatar, job)) == []


def _refusing_client(refusals: int, key: str):
    """A real S3 client whose next `refusals` DeleteObjects answers report `key` refused
    (SlowDown), as S3 may under load, while moto deleted it."""
    import boto3

    client = boto3.client("s3")
    left = [refusals]

    def refuse_one(parsed, **_) -> None:
        if left[0] > 0:
            left[0] -= 1
            parsed["Errors"] = [{"Key": key, "Code": "SlowDown", "Message": "Reduce your request rate."}]

    client.meta.events.register("after-call.s3.DeleteObjects", refuse_one)
    return client


def _checkpoint(client, user: str, avatar: str, job: str, step: int) -> None:
    for name in ("a.bin", "b.bin"):
        client.put_object(
            Bucket=TEST_BUCKET, Key=checkpoint_prefix(user, avatar, job) + f"{step:09d}/{name}", Body=b"x"
        )


def test_a_bulk_delete_s3_keeps_refusing_raises_instead_of_reporting_done(s3, tmp_path) -> None:
    """DeleteObjects answers 200 with the keys it refused in `Errors` (SlowDown, InternalError):
    refused keys are sent again; a refusal that lasts fails the cleanup (the job's tail is then
    retried) rather than leaving checkpoints behind silently. A passing refusal is no failure."""
    import pytest

    user, avatar, job = "del-" + uuid.uuid4().hex[:8], "a", "job-1"
    refused = checkpoint_prefix(user, avatar, job) + "000000010/b.bin"
    client = _refusing_client(refusals=3, key=refused)
    _checkpoint(client, user, avatar, job, 10)
    with pytest.raises(RuntimeError, match=r"refused to delete 1 object\(s\) 3 times.*b.bin: SlowDown"):
        ArtifactStore(client, TEST_BUCKET).delete_checkpoints(user, avatar, job)

    client = _refusing_client(refusals=1, key=refused)
    _checkpoint(client, user, avatar, job, 10)
    ArtifactStore(client, TEST_BUCKET).delete_checkpoints(user, avatar, job)
    assert keys_under(s3, checkpoint_prefix(user, avatar, job)) == []


def test_a_refused_tidy_up_never_fails_the_checkpoint_that_triggered_it(s3, tmp_path) -> None:
    """Dropping the previous checkpoint after a new one only saves space: S3 refusing it is
    logged, and the new checkpoint stands (the job's tail removes every checkpoint at the end)."""
    user, avatar, job = "tidy-" + uuid.uuid4().hex[:8], "a", "job-1"
    client = _refusing_client(refusals=3, key=checkpoint_prefix(user, avatar, job) + "000000005/b.bin")
    _checkpoint(client, user, avatar, job, 5)
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    store = ArtifactStore(client, TEST_BUCKET)
    store.save_checkpoint(user, avatar, job, ckpt, 10)
    assert store.latest_checkpoint(user, avatar, job) == 10
