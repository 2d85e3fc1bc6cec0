"""Benchmark 4: job overhead on a warm worker.

Stack: moto in server mode (S3 + SQS) <- the real API under uvicorn <- this process, which
also runs a real `trainer.worker.Worker` in a thread (a warm worker: imports done, clients
made, long-polling the train queue). Two jobs are posted one after the other on the tiny
model (`trainer.tiny_model` defaults); each is timed from sending `POST .../training-jobs` to
`GET .../training-jobs/{id}` answering `succeeded` (polled every 10 ms), and split into phases
by timing the worker's own calls from the outside (wrappers installed on the runner's objects,
no change to the worker's code). The worker's heartbeat thread is not on the job's path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import PY, ROOT, free_port, machine, ready_process, secs, stop, table, today, wait_http

SECRET = "bench-secret-" + uuid.uuid4().hex
PHASES = [
    ("queue pickup", "SQS accepted the message (its SentTimestamp) -> the worker's long poll returned it"),
    (
        "status writes",
        "job record claim / data pin / finish (conditional S3 writes), active slot, checkpoint cleanup, "
        "events, message delete",
    ),
    ("config + lookups", "stored adapter config, checkpoint and published-version lookups"),
    ("data download", "list, tag reads, downloads and parsing of the documents"),
    ("tokenize", "chat template + labels (`build_examples`)"),
    ("model load", "base model (and tokenizer) from disk"),
    ("training setup", "LoRA injection, Trainer construction, eval before/after, adapter save, LoRA removal"),
    ("training", "`Trainer.train`"),
    (
        "evaluation + samples",
        "the new version against the current one on held-out examples (`promote`) and `samples.json` (greedy "
        "completions of base and adapter on `SAMPLE_PROMPTS`): work the job's result carries, not overhead",
    ),
    ("upload", "adapter version + current files + manifest"),
    ("worker, in no phase", "the rest of the worker's run (splitting the data, logging, ...)"),
    (
        "seen by the client",
        "the worker finished the message -> the client's poll saw `succeeded` (negative: seen "
        "before the worker's last cleanup, which follows the status write)",
    ),
]


class Recorder:
    """Accumulates the wall time of wrapped calls per phase, while a job is being timed."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}
        self.depth = threading.local()

    def wrap(self, obj: Any, attr: str, phase: str) -> None:
        original = getattr(obj, attr)
        recorder = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer = getattr(recorder.depth, "n", 0) == 0  # nested wrapped calls count once
            recorder.depth.n = getattr(recorder.depth, "n", 0) + 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                recorder.depth.n -= 1
                if outer and threading.current_thread().name == "bench-worker":
                    recorder.phases[phase] += time.perf_counter() - t0

        setattr(obj, attr, timed)


def _instrument(worker: Any, rec: Recorder) -> None:
    import trainer.jobs.lora as lora
    import trainer.jobs.training_setup as training_setup
    import trainer.training as training

    runner = worker.runner
    sqs = worker.sqs
    original_receive = sqs.receive_message

    def receive(*args: Any, **kwargs: Any) -> Any:
        # Also ask for SentTimestamp: pickup = receive time - the time SQS accepted the message.
        kwargs["MessageSystemAttributeNames"] = [*kwargs.get("MessageSystemAttributeNames", []), "SentTimestamp"]
        resp = original_receive(*args, **kwargs)
        messages = resp.get("Messages") or []
        if messages:
            sent = int(messages[0].get("Attributes", {}).get("SentTimestamp", 0)) / 1000
            rec.marks["pickup"] = time.time() - sent if sent else float("nan")
        return resp

    sqs.receive_message = receive
    stores = runner.stores
    for obj, attr in (
        (stores.jobs, "update"),
        (stores.jobs, "load"),
        (stores.jobs, "create"),
        (stores.jobs, "clear_active_pointer"),
        (stores.jobs, "ensure_active_pointer"),
        (stores.artifacts, "delete_checkpoints"),
        (runner.events, "publish"),
        (sqs, "delete_message"),
    ):
        rec.wrap(obj, attr, "status writes")
    rec.wrap(training_setup, "resolved_config", "config + lookups")
    rec.wrap(stores.artifacts, "latest_checkpoint", "config + lookups")
    rec.wrap(stores.artifacts, "version_of_job", "config + lookups")
    rec.wrap(stores.documents, "fetch", "data download")
    rec.wrap(training_setup, "build_examples", "tokenize")
    rec.wrap(stores.models, "tokenizer", "model load")
    rec.wrap(stores.models, "get", "model load")
    rec.wrap(stores.artifacts, "publish", "upload")
    rec.wrap(lora, "train_adapter", "training setup")
    rec.wrap(lora, "evaluate_version", "evaluation + samples")
    original_handle = worker.handle

    def handle(*args: Any, **kwargs: Any) -> Any:  # one message: parse, run the job, delete the message
        rec.marks["run_start"] = time.perf_counter()
        try:
            return original_handle(*args, **kwargs)
        finally:
            rec.marks["run_end"] = time.perf_counter()

    worker.handle = handle

    real_trainer = training.Trainer

    class TimedTrainer(real_trainer):  # type: ignore[misc, valid-type]
        def train(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super().train(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                rec.phases["training"] += spent
                rec.phases["training setup"] -= spent  # train_adapter's own time minus Trainer.train

    training.Trainer = TimedTrainer


def _document(n: int = 40) -> bytes:
    import json

    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"question {i}: how was your day, and what did you do?"},
                    {
                        "role": "assistant",
                        "content": f"answer {i}: a long walk, then coffee with a friend; a good day.",
                    },
                ]
            }
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def run(jobs: int = 2, log=print) -> dict[str, Any]:
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    tmp = Path(tempfile.mkdtemp(prefix="avatune-bench-jobs-"))
    from trainer.tiny_model import write_tiny_model

    model_dir = write_tiny_model(tmp / "model")
    results = []
    with ready_process([PY, "-m", "bench.moto_server"], env=env, stdin=True) as (_, moto_port):
        endpoint = f"http://127.0.0.1:{moto_port}"
        suffix = uuid.uuid4().hex[:6]
        stack_env = dict(
            env,
            AWS_ENDPOINT_URL=endpoint,
            S3_BUCKET="avatune-bench-jobs",
            TRAIN_QUEUE_NAME=f"bench-{suffix}.fifo",
            EVENTS_QUEUE_NAME=f"bench-{suffix}-events",
            AUTH_JWT_SECRET=SECRET,
            BASE_MODEL=str(model_dir),
            TORCH_THREADS=str(os.cpu_count() or 1),
        )
        saved_env = dict(os.environ)
        os.environ.update(stack_env)
        try:
            from infra.bootstrap import StackNames, bootstrap

            bootstrap(
                StackNames(
                    bucket="avatune-bench-jobs",
                    train_queue=f"bench-{suffix}.fifo",
                    events_queue=f"bench-{suffix}-events",
                ),
                endpoint_url=endpoint,
            )
            api_port = free_port()
            api = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "uvicorn",
                    "handlers.app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=stack_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_http(f"http://127.0.0.1:{api_port}/healthz", api)
                results = _jobs(f"http://127.0.0.1:{api_port}", jobs, log)
            finally:
                stop(api)
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return {"jobs": results, "machine": machine(), "date": today()}


def _jobs(api_url: str, n: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    import torch

    from handlers.auth import issue_token
    from trainer import aws as trainer_aws
    from trainer.settings import get_settings
    from trainer.worker import Worker

    logging.getLogger("avatune.trainer").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    get_settings.cache_clear()
    trainer_aws.client.cache_clear()
    trainer_aws.queue_url.cache_clear()
    torch.set_num_threads(os.cpu_count() or 1)
    worker = Worker(get_settings())
    rec = Recorder()
    _instrument(worker, rec)
    thread = threading.Thread(target=worker.run_forever, name="bench-worker", daemon=True)
    thread.start()
    user = "bench-" + uuid.uuid4().hex[:8]
    client = httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {issue_token(SECRET, user)}"}, timeout=60
    )
    base = f"/v1/users/{user}/avatars/a1"
    client.put(f"{base}/training-data/chat.jsonl", content=_document()).raise_for_status()
    time.sleep(1.0)  # the worker is idle in its long poll
    out = []
    try:
        for i in range(n):
            log(f"  job overhead: job {i + 1}")
            rec.phases.clear()
            rec.marks.clear()
            t_send = time.perf_counter()
            r = client.post(f"{base}/training-jobs", json={"num_epochs": 1})
            t_answered = time.perf_counter()
            r.raise_for_status()
            job_id = r.json()["id"]
            while True:
                job = client.get(f"{base}/training-jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.01)
            t_done = time.perf_counter()
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            time.sleep(0.3)  # let the worker finish its last writes (message delete) before reading the split
            phases = dict(rec.phases)
            total = t_done - t_send
            span = rec.marks["run_end"] - rec.marks["run_start"]
            phases["worker, in no phase"] = span - sum(phases.values())
            phases["queue pickup"] = rec.marks.get("pickup", float("nan"))
            phases["seen by the client"] = t_done - rec.marks["run_end"]
            out.append(
                {
                    "job": i + 1,
                    "total": total,
                    "post": t_answered - t_send,
                    "phases": phases,
                    "metrics": job.get("metrics") or {},
                    "attempts": job.get("attempts"),
                }
            )
            time.sleep(1.0)
    finally:
        worker.shutdown.set()
        thread.join(timeout=30)
    return out


def markdown(result: dict[str, Any], command_line: str) -> str:
    jobs = result["jobs"]
    headers = (
        ["phase"]
        + [f"job {j['job']}" + (" (loads the model)" if j["job"] == 1 else " (same base)") for j in jobs]
        + ["what"]
    )
    rows = []
    for phase, what in PHASES:
        rows.append([phase] + [_signed(j["phases"].get(phase, 0.0)) for j in jobs] + [what])
    rows.append(
        ["POST request"]
        + [secs(j["post"]) for j in jobs]
        + ["the API checks, writes the job and queues it; the worker's run starts before the answer arrives"]
    )
    rows.append(["**total** (POST sent → `succeeded` seen)"] + [f"**{secs(j['total'])}**" for j in jobs] + [""])
    rows.append(
        ["**everything but training**"]
        + [f"**{secs(j['total'] - j['phases'].get('training', 0))}**" for j in jobs]
        + [""]
    )
    last = jobs[-1]
    evaluation = last["phases"].get("evaluation + samples", 0)
    non_training = last["total"] - last["phases"].get("training", 0)
    overhead = non_training - evaluation
    pickup = last["phases"]["queue pickup"]
    load = last["phases"].get("model load", 0)
    out = [
        "## 4. Job overhead on a warm worker",
        "",
        "Tiny model (`trainer.tiny_model` defaults), one 40-conversation `.jsonl` document, `num_epochs: 1`, the "
        f"worker's defaults otherwise (trained with method `{last['metrics'].get('method')}`"
        f"{'; 4-bit loading fell back to lora on this machine' if last['metrics'].get('fallback') else ''}). Moto in "
        "server mode (S3 + SQS, no injected latency), the API under uvicorn, a `trainer.worker.Worker` running in a "
        "thread of the benchmark process, polled at 10 ms. Phases are timed by wrapping the runner's calls "
        "from outside.",
        "",
        table(headers, rows),
        "",
        f"- Everything but training under 1 s on a warm worker (job {last['job']}): "
        f"**{'met' if non_training < 1 else 'not met'}** ({secs(non_training)}); without the evaluation and "
        f"samples every training job now produces ({secs(evaluation)}), the job's overhead is "
        f"**{secs(overhead)}** ({'met' if overhead < 1 else 'not met'}).",
        f"- Queue pickup under 0.5 s (the worker long-polls with `WaitTimeSeconds=20`; no sleep loop): "
        f"**{'met' if pickup < 0.5 else 'not met'}** ({secs(pickup)}).",
        f"- A second job on the same base spends no time loading it: **{'met' if load < 0.05 else 'not met'}** "
        f"({secs(load)}; job metrics `base_model_reused`: {last['metrics'].get('base_model_reused')}).",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Reproduce: `{command_line}`.",
        "",
    ]
    return "\n".join(out)


def _signed(value: float) -> str:
    return ("−" + secs(-value)) if value < 0 else secs(value)
