"""Evaluation of trained adapters end to end (API -> queue -> a real trainer on the tiny model
-> S3 -> API): `promote: if_better` keeping the current adapter when a diverging learning rate
made eval loss worse, samples.json (base vs adapter completions), loss.png and the loss curve,
the job's links to them and the version-file route, and DELETE of the adapter taking merged/
with it. Plus the publish/promote rules of the artifact store against moto directly."""

from __future__ import annotations

import io
import math
import re
import struct
import uuid
from collections.abc import Iterator

import pytest

from contracts.adapters import AdapterManifest, VersionMetrics, VersionSamples
from contracts.keys import (
    ADAPTER_FILES,
    LOSS_CURVE_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    adapter_manifest_key,
    adapter_prefix,
    adapter_version_prefix,
    full_model_prefix,
    merged_prefix,
    training_data_prefix,
    version_file_key,
)
from tests.conftest import TEST_BUCKET, Api, adapter_dir, keys_under
from tests.pipeline import Pipeline, chat_document, wait_for_job
from trainer.artifacts import ArtifactStore
from trainer.evaluation import decide, eval_steps, loss_curve

GOOD = {"num_epochs": 2, "batch_size": 4, "learning_rate": 0.01, "r": 4}
# Far too high a learning rate for the tiny model: its eval loss ends well above GOOD's.
DIVERGING = {**GOOD, "learning_rate": 1.0}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker(SAMPLE_PROMPTS="3", SAMPLE_MAX_NEW_TOKENS="24")
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


def train(pipeline: Pipeline, api: Api, body: dict) -> dict:
    r = api.post(f"{api.base}/training-jobs", json=body)
    assert r.status_code == 202, r.text
    done, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert done["status"] == "succeeded", done
    return done


def s3_bytes(s3, key: str) -> bytes:
    return s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read()


def current_state(s3, api: Api) -> dict[str, bytes]:
    """The current adapter as a reader sees it: the manifest and the files it names."""
    prefix = adapter_prefix(api.user_id, api.avatar_id)
    keys = [adapter_manifest_key(api.user_id, api.avatar_id), *(prefix + name for name in ADAPTER_FILES)]
    return {key: s3_bytes(s3, key) for key in keys}


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (the first chunk, right after the signature)."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def test_if_better_keeps_the_current_adapter_when_the_new_one_is_worse(pipeline: Pipeline, worker, s3) -> None:
    api = pipeline.client()
    assert api.put_doc("chat.jsonl", chat_document()).status_code == 201

    # Version 1, promote "always" (the default): current, with its verdict recorded.
    first = train(pipeline, api, GOOD)
    m1 = first["metrics"]
    assert first["adapter_version"] == 1
    assert m1["promote"] == "always" and m1["promoted"] is True and "eval_loss_current" not in m1
    before = current_state(s3, api)
    assert (
        AdapterManifest.model_validate_json(before[adapter_manifest_key(api.user_id, api.avatar_id)]).current_version
        == 1
    )

    # Version 2 with a diverging learning rate and if_better: kept, not promoted.
    worse = train(pipeline, api, {**DIVERGING, "promote": "if_better"})
    m2 = worse["metrics"]
    assert worse["adapter_version"] == 2
    assert m2["eval_loss_after"] > m2["eval_loss_current"], m2  # the premise: training made it worse
    assert m2["promote"] == "if_better" and m2["promoted"] is False, m2
    assert m2["compared_with"] == "the current version 1" and "got worse" in m2["promote_reason"]
    # The yardstick is version 1 re-evaluated on this job's held-out split (the same split: same
    # documents and seed), not the base: it matches version 1's own eval loss after training.
    assert m2["eval_loss_current"] == pytest.approx(m1["eval_loss_after"], rel=1e-4)
    assert m2["eval_loss_current"] < m2["eval_loss_before"]
    assert current_state(s3, api) == before  # manifest and current files byte for byte
    adapter = api.get(f"{api.base}/adapter").json()
    assert adapter["current_version"] == 1 and adapter["metrics"]["promoted"] is True
    # ... yet version 2 is complete and kept, its verdict in its metrics.json, promotable later.
    versions = {v["version"]: v for v in api.get(f"{api.base}/adapter/versions").json()["items"]}
    assert set(versions) == {1, 2} and versions[2]["metrics"]["promoted"] is False
    promoted = api.post(f"{api.base}/adapter/versions/2/promote")
    assert promoted.status_code == 200 and promoted.json()["current_version"] == 2

    # A normal if_better job beats the (worse) current version 2 and is promoted.
    better = train(pipeline, api, {**GOOD, "promote": "if_better"})
    m3 = better["metrics"]
    assert better["adapter_version"] == 3
    assert m3["promoted"] is True and m3["compared_with"] == "the current version 2", m3
    assert m3["eval_loss_current"] == pytest.approx(m2["eval_loss_after"], rel=1e-4)
    assert m3["eval_loss_after"] <= m3["eval_loss_current"]
    manifest = AdapterManifest.model_validate_json(s3_bytes(s3, adapter_manifest_key(api.user_id, api.avatar_id)))
    assert manifest.current_version == 3 and manifest.job_id == better["id"]
    assert current_state(s3, api) != before
    api.close()


@pytest.fixture(scope="module")
def first_if_better(pipeline: Pipeline, worker) -> Iterator[tuple[Api, dict]]:
    """A new avatar's first adapter, trained with if_better (so compared with the base)."""
    api = pipeline.client()
    assert api.put_doc("chat.jsonl", chat_document()).status_code == 201
    yield api, train(pipeline, api, {**GOOD, "promote": "if_better"})
    api.close()


def test_if_better_on_an_avatar_without_an_adapter_compares_with_the_base(first_if_better, s3) -> None:
    api, done = first_if_better
    m = done["metrics"]
    assert m["compared_with"] == "the base model" and m["eval_loss_current"] == m["eval_loss_before"]
    assert m["promoted"] is True and m["eval_loss_after"] < m["eval_loss_before"]
    assert api.get(f"{api.base}/adapter").json()["current_version"] == 1

    # Samples, loss curve and metrics, reached through the job's links.
    links = done["links"]
    base = f"{api.base}/adapter/versions/1/files/"
    assert links == {
        "metrics": base + METRICS_FILE,
        "samples": base + SAMPLES_FILE,
        "loss_curve": base + LOSS_CURVE_FILE,
    }

    r = api.get(links["samples"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    samples = VersionSamples.model_validate_json(r.content)
    assert samples.job_id == done["id"] and samples.decoding == "greedy" and samples.max_new_tokens == 24
    assert len(samples.samples) == 3 and samples.note is None
    documents = chat_document().decode()
    for sample in samples.samples:
        # A held-out conversation: its question in the prompt, its answer as the reference.
        n = re.search(r"question (\d+): how are you\?", sample.prompt).group(1)
        assert sample.reference == f"answer {n}: great, thanks for asking" and sample.reference in documents
        assert sample.prompt.rstrip().endswith("<|end_header_id|>") and sample.prompt_tokens > 0
    # The adapter answers differently from the base (what a person comes to read).
    assert any(s.adapter != s.base for s in samples.samples)
    assert s3.head_object(Bucket=TEST_BUCKET, Key=version_file_key(api.user_id, api.avatar_id, 1, SAMPLES_FILE))

    r = api.get(links["loss_curve"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    width, height = png_size(r.content)
    assert width >= 200 and height >= 100
    from PIL import Image

    with Image.open(io.BytesIO(r.content)) as image:
        image.verify()
        assert image.format == "PNG" and image.size == (width, height)

    r = api.get(links["metrics"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    stored = VersionMetrics.model_validate_json(r.content)
    assert stored.job_id == done["id"] and stored.metrics["promoted"] is True
    curve = stored.metrics["loss_curve"]
    assert curve == m["loss_curve"]
    steps = m["steps"]
    assert [s for s, _ in curve["train"]] == list(range(1, steps + 1))  # one point per step (logging_steps=1)
    assert all(isinstance(v, float) and v > 0 for _, v in curve["train"])
    eval_steps_seen = [s for s, _ in curve["eval"]]
    # Start, a few evenly spaced points, end; start and end are the job's before/after losses.
    assert eval_steps_seen[0] == 0 and eval_steps_seen[-1] == steps and len(eval_steps_seen) >= 4
    assert eval_steps_seen == sorted(set(eval_steps_seen))
    assert curve["eval"][0][1] == m["eval_loss_before"] and curve["eval"][-1][1] == m["eval_loss_after"]


def test_version_file_route_refuses_other_names_and_missing_versions(pipeline: Pipeline, first_if_better) -> None:
    api, done = first_if_better
    files = f"{api.base}/adapter/versions/{done['adapter_version']}/files"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        ".claim",
        "manifest.json",
        "..%2F..%2Fmanifest.json",
    ):
        r = api.get(f"{files}/{name}")
        assert r.status_code == 404, (name, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    r = api.get(f"{api.base}/adapter/versions/99/files/{SAMPLES_FILE}")
    assert r.status_code == 404 and "no adapter version 99" in r.json()["detail"]
    assert api.get(f"{api.base}/adapter/versions/0/files/{SAMPLES_FILE}").status_code == 422
    with pipeline.client() as other:  # another user's token: never this avatar's files
        r = other.get(f"{files}/{SAMPLES_FILE}")
        assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")
        assert other.get(f"{other.base}/adapter/versions/1/files/{SAMPLES_FILE}").status_code == 404
    assert api.get(f"{files}/{SAMPLES_FILE}").status_code == 200
    # Listed jobs carry their links too.
    assert api.get(f"{api.base}/training-jobs").json()["items"][0]["links"] == done["links"]


def test_delete_adapter_removes_merged_models(pipeline: Pipeline, first_if_better, s3) -> None:
    api, _ = first_if_better
    r = api.post(f"{api.base}/fuse-jobs")
    assert r.status_code == 202, r.text
    fused, _ = wait_for_job(api, r.json()["id"], {"succeeded", "failed"}, pipeline=pipeline)
    assert fused["status"] == "succeeded", fused
    # A fuse job's version is the one it merged: it links to the merged model, not to version files.
    assert fused["links"] == {"model": f"{api.base}/merged-models/1"}
    assert api.get(fused["links"]["model"]).status_code == 200
    merged = merged_prefix(api.user_id, api.avatar_id)
    assert keys_under(s3, merged)  # the premise: a merged model exists
    # A full fine-tune's model (written here directly: a full job is tested in test_job_spec_trainer).
    full = full_model_prefix(api.user_id, api.avatar_id)
    for name in ("model.safetensors", "manifest.json"):
        s3.put_object(Bucket=TEST_BUCKET, Key=f"{full}1/{name}", Body=b"x")

    assert api.delete(f"{api.base}/adapter").status_code == 204
    assert keys_under(s3, merged) == []
    assert keys_under(s3, full) == []
    assert keys_under(s3, adapter_version_prefix(api.user_id, api.avatar_id, 1)) == []
    assert keys_under(s3, training_data_prefix(api.user_id, api.avatar_id))  # training data stays
    assert api.get(f"{api.base}/adapter/versions/1/files/{SAMPLES_FILE}").status_code == 404
    assert api.get(fused["links"]["model"]).status_code == 404
    assert api.get(f"{api.base}/merged-models").json() == api.get(f"{api.base}/full-models").json() == {"items": []}


# -- the artifact store and the verdict, without a trainer -------------------------------------


def test_publish_without_promotion_and_a_promotion_finished_on_retry(s3, tmp_path) -> None:
    user, avatar = "ev-" + uuid.uuid4().hex[:8], "a"
    store = ArtifactStore(s3, TEST_BUCKET)
    assert (
        store.publish(
            user,
            avatar,
            adapter_dir(tmp_path, 1),
            job_id="job-1",
            base_model="tiny",
            metrics={"promoted": True},
            keep_versions=5,
        )
        == 1
    )
    manifest_key = adapter_manifest_key(user, avatar)
    manifest_v1 = s3_bytes(s3, manifest_key)

    extra = {SAMPLES_FILE: tmp_path / "s.json", LOSS_CURVE_FILE: tmp_path / "l.png"}
    extra[SAMPLES_FILE].write_text("{}")
    extra[LOSS_CURVE_FILE].write_bytes(PNG_SIGNATURE)
    assert (
        store.publish(
            user,
            avatar,
            adapter_dir(tmp_path, 2),
            job_id="job-2",
            base_model="tiny",
            metrics={"promoted": False},
            keep_versions=5,
            extra_files=extra,
            promote=False,
        )
        == 2
    )
    assert s3_bytes(s3, manifest_key) == manifest_v1
    assert s3_bytes(s3, adapter_prefix(user, avatar) + "adapter_model.safetensors") == bytes([1]) * 64
    prefix = adapter_version_prefix(user, avatar, 2)
    assert sorted(keys_under(s3, prefix)) == sorted(
        prefix + n for n in (".claim", METRICS_FILE, SAMPLES_FILE, LOSS_CURVE_FILE, *ADAPTER_FILES)
    )
    assert s3.head_object(Bucket=TEST_BUCKET, Key=prefix + LOSS_CURVE_FILE)["ContentType"] == "image/png"
    # A retry of the job that was not promoted leaves it so.
    assert store.finish_promotion(user, avatar, 2).metrics == {"promoted": False}
    assert s3_bytes(s3, manifest_key) == manifest_v1

    # A job that died between its metrics.json and the manifest: the retry completes the promotion.
    prefix3, files3 = adapter_version_prefix(user, avatar, 3), adapter_dir(tmp_path, 3)
    for name in ADAPTER_FILES:
        s3.upload_file(str(files3 / name), TEST_BUCKET, prefix3 + name)
    meta = VersionMetrics(version=3, job_id="job-3", base_model="tiny", metrics={"promoted": True})
    s3.put_object(Bucket=TEST_BUCKET, Key=prefix3 + METRICS_FILE, Body=meta.model_dump_json())
    assert store.finish_promotion(user, avatar, 3).job_id == "job-3"
    manifest = AdapterManifest.model_validate_json(s3_bytes(s3, manifest_key))
    assert manifest.current_version == 3 and manifest.job_id == "job-3"
    assert s3_bytes(s3, adapter_prefix(user, avatar) + "adapter_model.safetensors") == bytes([3]) * 64
    # Extra files may not stand in for the version's own.
    with pytest.raises(ValueError):
        store.publish(
            user,
            avatar,
            adapter_dir(tmp_path, 4),
            job_id="job-4",
            base_model="tiny",
            metrics={},
            keep_versions=5,
            extra_files={METRICS_FILE: extra[SAMPLES_FILE]},
        )


def test_verdict_and_curve_rules() -> None:
    assert decide("always", 9.0, 1.0, "x") == (True, "promote: always")
    assert decide("if_better", 1.0, 1.0, "x")[0] is True  # equal is not worse
    tie = decide("if_better", 6.13862, 6.138615, "x")  # a rounding-size difference is a tie, said as one
    assert tie[0] is True and "tied" in tie[1] and "6.13862 vs 6.138615" in tie[1]
    assert "improved" in decide("if_better", 0.9, 1.0, "x")[1]
    assert decide("if_better", 1.1, 1.0, "x")[0] is False
    assert decide("if_better", math.nan, 1.0, "x")[0] is False and decide("if_better", math.inf, None, "x")[0] is False
    assert decide("if_better", None, 1.0, "x")[0] is True  # no held-out data: no evidence of worse
    assert decide("if_better", 2.0, None, "x")[0] is True
    assert eval_steps(100) == {17, 33, 50, 67, 83} and eval_steps(3) == {1, 2} and eval_steps(1) == set()
    history = [{"loss": 3.0, "step": i} for i in range(1, 2001)] + [
        {"eval_loss": 2.5, "step": 0},
        {"eval_loss": math.inf, "step": 1000},
    ]
    curve = loss_curve(history, 2000, 2.0)
    assert len(curve["train"]) == 500 and curve["train"][0][0] == 1 and curve["train"][-1][0] == 2000
    assert curve["eval"] == [[0, 2.5], [1000, None], [2000, 2.0]]


def test_if_better_compares_on_examples_neither_version_trained_on() -> None:
    """The current version held out the conversations below its cutoff and trained on the rest:
    only held-out examples below both cutoffs are fair to both."""
    from trainer.dataset import HELD_OUT_RULE, TokenizedExample, key_fraction
    from trainer.evaluation import comparable_examples

    examples = [TokenizedExample([i], [i], group=f"{i * (2**64 // 64):016x}") for i in range(1, 60)]
    held_out = [ex for ex in examples if key_fraction(ex.group) < 0.3]
    new = {"held_out_rule": HELD_OUT_RULE, "held_out_cutoff": 0.3}
    current = {"held_out_rule": HELD_OUT_RULE, "held_out_cutoff": 0.1}
    fair, note = comparable_examples(held_out, new, current)
    assert fair and all(key_fraction(ex.group) < 0.1 for ex in fair)
    assert len(fair) < len(held_out) and f"{len(fair)} of {len(held_out)}" in note
    # A current version trained before the rule existed: compared on all, and said so.
    everything, caveat = comparable_examples(held_out, new, {})
    assert everything == held_out and "may have trained on some" in caveat
