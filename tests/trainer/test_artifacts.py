"""Adapter versions and checkpoints in S3 (moto server, real boto3)."""

from __future__ import annotations

import json
import uuid

from contracts.keys import adapter_manifest_key, adapter_prefix, checkpoint_prefix
from tests.conftest import TEST_BUCKET, keys_under
from trainer.artifacts import ArtifactStore


def adapter_dir(tmp_path, n: int):
    d = tmp_path / f"adapter-{n}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": n}))
    (d / "adapter_model.safetensors").write_bytes(bytes([n]) * 64)
    return d


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


def test_a_bulk_delete_s3_partly_refused_raises_instead_of_reporting_done(s3, tmp_path) -> None:
    """DeleteObjects answers 200 with the keys it refused in `Errors` (SlowDown, InternalError):
    the cleanup must fail (and be retried) rather than leave checkpoints behind silently."""
    import boto3
    import pytest

    user, avatar, job = "del-" + uuid.uuid4().hex[:8], "a", "job-1"
    client = boto3.client("s3")
    prefix = checkpoint_prefix(user, avatar, job) + "000000010/"
    for name in ("a.bin", "b.bin"):
        client.put_object(Bucket=TEST_BUCKET, Key=prefix + name, Body=b"x")

    def refuse_one(parsed, **_) -> None:  # S3 deleted the batch but for one key, as it may under load
        parsed["Errors"] = [{"Key": prefix + "b.bin", "Code": "SlowDown", "Message": "Reduce your request rate."}]

    client.meta.events.register("after-call.s3.DeleteObjects", refuse_one)
    with pytest.raises(RuntimeError, match="refused to delete 1 of 2 objects.*b.bin: SlowDown"):
        ArtifactStore(client, TEST_BUCKET).delete_checkpoints(user, avatar, job)
