"""Load every adapter version that becomes current into a running serving engine: a small
consumer recipe of avatune's events (docs/serving.md, "Following new versions").

    an events-queue body -> `current_version_of`: the version became current? (the train
        job's `job.succeeded` unless its metrics say `promoted: false` or it was `method: full`;
        `adapter.promoted` for a promote or a rollback) -> `CurrentVersion`, else None
    -> `ApiExports.fetch`: still the avatar's current version? (events may arrive late or out of
        order: a stale one is skipped) -> the version in the engine's format through the API,
        with a service token: `GET {base}/exports/{n}/{format}`, or `POST {base}/exports` and
        its job awaited -> the files from their presigned URLs, sha256 checked
    -> the engine: `VllmEngine` hot-swaps (`POST /v1/load_lora_adapter`, the server started with
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); `LlamaCppEngine` switches scales when the file is
        one the server started with (`POST /lora-adapters`), otherwise it restarts the server with
        it: llama.cpp cannot load a new adapter file at runtime.

Run it beside the engine, on a queue that receives avatune's events (in development the events
queue itself; on AWS a copy of it, e.g. an SNS fan-out, since the events Lambda consumes that queue):

    SERVING_HOOK_TOKEN=<service token> python -m infra.serving_hook --queue NAME --api URL \\
        --engine vllm --engine-url http://127.0.0.1:8000 --dir /srv/adapters
    ... --engine llama_cpp --engine-url http://127.0.0.1:8080 --restart-command 'systemctl restart llama'

The restart command gets the adapter's path as `{adapter}` (and in LLAMA_ADAPTER). Loading the
same version twice is harmless, so at-least-once delivery needs no bookkeeping here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from contracts.messages import (
    ADAPTER_EVENT_SCHEMA,
    JOB_EVENT_SCHEMA,
    AdapterEvent,
    ExportFormat,
    InvalidMessage,
    JobEvent,
    message_payload,
    parse_message,
)

log = logging.getLogger("avatune.serving_hook")

COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class CurrentVersion:
    """An avatar's adapter version that became current."""

    user_id: str
    avatar_id: str
    version: int
    event_id: str


def current_version_of(body: str) -> CurrentVersion | None:
    """The version an events-queue body makes current, or None (any other event). InvalidMessage
    for a body that is neither a job event nor an adapter event."""
    schema = message_payload(body).get("schema")
    if schema == ADAPTER_EVENT_SCHEMA:
        promoted: AdapterEvent = parse_message(body, AdapterEvent, ADAPTER_EVENT_SCHEMA)
        return CurrentVersion(promoted.user_id, promoted.avatar_id, promoted.adapter_version, promoted.event_id)
    event: JobEvent = parse_message(body, JobEvent, JOB_EVENT_SCHEMA)
    if event.event != "job.succeeded" or event.job_type != "train" or event.adapter_version is None:
        return None
    if event.metrics.get("method") == "full" or event.metrics.get("promoted") is False:
        return None
    return CurrentVersion(event.user_id, event.avatar_id, event.adapter_version, event.event_id)


class Stale(Exception):
    """The version is no longer the avatar's current one (a later event brings that one)."""


class ApiExports:
    """A version's files in a serving format, through the avatune API (a service-role token)."""

    def __init__(self, api_url: str, token: str, workdir: Path, *, wait_seconds: float = 900) -> None:
        self._http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self._workdir = workdir
        self._wait = wait_seconds

    def fetch(self, change: CurrentVersion, export_format: ExportFormat) -> Path:
        """The directory holding `change`'s version as `export_format`, downloaded once. Stale when
        the avatar's current version is another one by now."""
        base = f"/v1/users/{change.user_id}/avatars/{change.avatar_id}"
        current = self._http.get(f"{base}/adapter")
        current.raise_for_status()
        if current.json()["current_version"] != change.version:
            raise Stale(f"version {change.version} of {change.avatar_id} is no longer current")
        dest = self._workdir / change.user_id / change.avatar_id / str(change.version) / export_format
        if (dest / COMPLETE_MARKER).is_file():
            return dest
        view = self._export(base, change.version, export_format)
        dest.mkdir(parents=True, exist_ok=True)
        for file in view["files"]:
            _download(file["url"], dest / file["name"], file["sha256"])
        (dest / COMPLETE_MARKER).write_text(json.dumps({f["name"]: f["sha256"] for f in view["files"]}))
        return dest

    def _export(self, base: str, version: int, export_format: ExportFormat) -> dict[str, Any]:
        """The export's view, exporting it first (and waiting for the job) when there is none."""
        path = f"{base}/exports/{version}/{export_format}"
        found = self._http.get(path)
        if found.status_code != 404:
            found.raise_for_status()
            return found.json()
        deadline = time.monotonic() + self._wait
        job = self._http.post(f"{base}/exports", json={"adapter_version": version, "format": export_format})
        while job.status_code in (409, 429, 503) and time.monotonic() < deadline:  # the avatar is busy: wait
            time.sleep(2)
            job = self._http.post(f"{base}/exports", json={"adapter_version": version, "format": export_format})
        job.raise_for_status()
        record = job.json()
        while record["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(1)
            record = self._http.get(f"{base}/training-jobs/{record['id']}").json()
        if record["status"] != "succeeded":
            raise RuntimeError(f"export job {record['id']} ended {record['status']}: {record.get('error')}")
        found = self._http.get(path)
        found.raise_for_status()
        return found.json()


def _download(url: str, dest: Path, sha256: str | None) -> None:
    digest = hashlib.sha256()
    partial = dest.with_name(dest.name + ".part")
    with httpx.stream("GET", url, timeout=300) as resp, open(partial, "wb") as out:
        resp.raise_for_status()
        for chunk in resp.iter_bytes(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        partial.unlink()
        raise RuntimeError(f"{dest.name}: sha256 {digest.hexdigest()} is not the manifest's {sha256}")
    partial.replace(dest)


class Engine(Protocol):
    """A running serving engine that takes an avatar's new current version."""

    format: ExportFormat

    def load(self, change: CurrentVersion, files: Path) -> str:
        """Serve `files` for the avatar from now on; what was done (for the log)."""
        ...


class VllmEngine:
    """vLLM's OpenAI server, started with `--enable-lora --max-lora-rank N` and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: the avatar's adapter is served under the model name
    `lora_name(change)` (the avatar id by default), replaced in place."""

    format: ExportFormat = "peft"

    def __init__(self, url: str, lora_name: Callable[[CurrentVersion], str] = lambda c: c.avatar_id) -> None:
        self._http = httpx.Client(base_url=url, timeout=300)
        self._name = lora_name

    def load(self, change: CurrentVersion, files: Path) -> str:
        name = self._name(change)
        # The same name cannot be loaded twice: take the old version out first (absent: 4xx, fine).
        self._http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        resp = self._http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(files)})
        if resp.status_code != 200:
            raise RuntimeError(f"vLLM refused {files}: {resp.text}")
        return f"loaded as {name!r}"


class LlamaCppEngine:
    """llama.cpp's `llama-server`: adapters are loaded at start (`--lora FILE`, several allowed)
    and only their scales change at runtime (`POST /lora-adapters`). A version among them is
    switched to at once; any other needs `restart(adapter_file)` to start the server with it."""

    format: ExportFormat = "gguf"

    def __init__(self, url: str, restart: Callable[[Path], None]) -> None:
        self._http = httpx.Client(base_url=url, timeout=60)
        self._restart = restart

    def adapters(self) -> list[dict[str, Any]]:
        resp = self._http.get("/lora-adapters")
        resp.raise_for_status()
        return list(resp.json())

    def load(self, change: CurrentVersion, files: Path) -> str:
        adapter = (files / "adapter.gguf").resolve()
        loaded = self.adapters()
        if any(Path(a["path"]).resolve() == adapter for a in loaded):
            scales = [{"id": a["id"], "scale": 1.0 if Path(a["path"]).resolve() == adapter else 0.0} for a in loaded]
            self._http.post("/lora-adapters", json=scales).raise_for_status()
            return f"switched to {adapter.name} of version {change.version} (no restart)"
        self._restart(adapter)
        return f"restarted with {adapter}"


class ServingHook:
    """Turns events into loads: `handle(body)` for one events-queue body."""

    def __init__(self, exports: ApiExports, engine: Engine) -> None:
        self.exports = exports
        self.engine = engine

    def handle(self, body: str) -> str | None:
        """What was done for the event, or None when it makes no version current (or a stale one)."""
        change = current_version_of(body)
        if change is None:
            return None
        try:
            files = self.exports.fetch(change, self.engine.format)
        except Stale as exc:
            log.info("skipped: %s", exc)
            return None
        done = self.engine.load(change, files)
        log.info("avatar %s version %d: %s", change.avatar_id, change.version, done)
        return done


def restart_command(template: str) -> Callable[[Path], None]:
    """A restart that runs `template` (no shell) with `{adapter}` replaced by the adapter file."""

    def restart(adapter: Path) -> None:
        argv = [part.replace("{adapter}", str(adapter)) for part in shlex.split(template)]
        subprocess.run(argv, check=True, env={**os.environ, "LLAMA_ADAPTER": str(adapter)})

    return restart


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.serving_hook", description=__doc__.split("\n")[0])
    parser.add_argument("--queue", required=True, help="an SQS queue receiving avatune's events")
    parser.add_argument("--api", required=True, help="the avatune API's base URL")
    parser.add_argument("--engine", choices=["vllm", "llama_cpp"], required=True)
    parser.add_argument("--engine-url", required=True)
    parser.add_argument("--dir", type=Path, required=True, help="where versions are downloaded")
    parser.add_argument("--restart-command", help="llama_cpp: restarts llama-server with {adapter}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    token = os.environ["SERVING_HOOK_TOKEN"]
    if args.engine == "vllm":
        engine: Engine = VllmEngine(args.engine_url)
    elif args.restart_command:
        engine = LlamaCppEngine(args.engine_url, restart_command(args.restart_command))
    else:
        parser.error("--engine llama_cpp needs --restart-command (llama.cpp loads adapter files only at start)")
    hook = ServingHook(ApiExports(args.api, token, args.dir), engine)
    import boto3

    sqs = boto3.client("sqs", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    url = sqs.get_queue_url(QueueName=args.queue)["QueueUrl"]
    while True:
        for message in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=20).get(
            "Messages", []
        ):
            try:
                hook.handle(message["Body"])
            except InvalidMessage as exc:
                log.warning("not an avatune event, dropped: %s", exc)
            except Exception:
                log.exception("loading failed; the event comes back after its visibility timeout")
                continue
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


if __name__ == "__main__":
    main()
