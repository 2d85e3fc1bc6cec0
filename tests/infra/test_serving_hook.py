"""The serving hook's reading of events (infra/serving_hook.py): which events make a version
current. Its loading into real engines is tests/trainer/test_serving_engine.py (llama.cpp) and
tests/trainer/test_serving_vllm.py (vLLM)."""

from __future__ import annotations

import sys

import pytest

from contracts.messages import AdapterEvent, InvalidMessage, JobEvent
from infra.serving_hook import CurrentVersion, current_version_of, restart_command


def _job(event: str = "job.succeeded", **fields) -> str:
    values = dict(job_id="job-1", user_id="u1", avatar_id="a1", status="succeeded", job_type="train")
    return JobEvent(event=event, **{**values, **fields}).to_message_body()


def test_a_train_job_that_made_its_version_current() -> None:
    body = _job(adapter_version=3, metrics={"promoted": True, "method": "lora"})
    assert current_version_of(body) == CurrentVersion("u1", "a1", 3, "job-1:job.succeeded")
    assert current_version_of(_job(adapter_version=3)) is not None, "no promote metric: promote always"


@pytest.mark.parametrize(
    "body",
    [
        _job(adapter_version=3, metrics={"promoted": False}),  # if_better kept the current adapter
        _job(adapter_version=3, metrics={"method": "full"}),  # a whole model, no adapter
        _job(adapter_version=None),
        _job("job.started", status="running", adapter_version=None),
        _job("job.failed", status="failed", adapter_version=3),
        _job(job_type="fuse", adapter_version=3),
        _job(job_type="export", adapter_version=3),
    ],
)
def test_other_events_make_no_version_current(body: str) -> None:
    assert current_version_of(body) is None


def test_a_promote_or_rollback() -> None:
    event = AdapterEvent(user_id="u1", avatar_id="a1", adapter_version=1, previous_version=4)
    assert current_version_of(event.to_message_body()) == CurrentVersion("u1", "a1", 1, event.event_id)
    assert event.event_id.startswith("u1/a1:adapter.promoted:1:")


@pytest.mark.parametrize(
    "body", ["not json", "[]", '{"schema": "someone.else/v1"}', '{"schema": "avatune.adapter-event/v1"}']
)
def test_foreign_or_broken_bodies_are_invalid(body: str) -> None:
    with pytest.raises(InvalidMessage):
        current_version_of(body)


def test_the_restart_command_gets_the_adapter_without_a_shell(tmp_path) -> None:
    out = tmp_path / "out"
    script = f"import os, sys; open({str(out)!r}, 'w').write(sys.argv[1] + '|' + os.environ['LLAMA_ADAPTER'])"
    restart_command(f"{sys.executable} -c {script!r} {{adapter}}")(tmp_path / "a b;.gguf")
    assert out.read_text() == f"{tmp_path / 'a b;.gguf'}|{tmp_path / 'a b;.gguf'}"
