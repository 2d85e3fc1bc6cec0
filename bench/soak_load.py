"""The fault soak's load (`bench.soak`), all through the real HTTP API, recorded in the ledger:

- per avatar, a **job loop**: training jobs of a few seconds (tiny model, `num_epochs` 2-6,
  `batch_size` 1-4), every fourth job a fuse or a generation job, a few cancelled; each job is
  watched until it is final (the loop stops watching when the load ends);
- per *churning* avatar (all but the last avatar of each user; the calm ones' documents never
  change, so their jobs can resume from checkpoints after a kill), a **writer**: PATCHes of
  the flag to true or false and re-uploads of the same bytes flagged true or false, one write
  per document at a time (a lock per document), so each document's last acknowledged write is
  known;
- per churning avatar, a **deleter**: "delete all unused" every few seconds, with PATCHes to
  true and re-uploads flagged true of documents now flagged false sent while it runs; after
  each round, with every document's lock held, each document whose last acknowledged write
  flagged it true must still be there (checked in S3, `bench.soak_checks.document_violations`);
- a **promoter**: promotes of kept versions of one avatar from several threads at once;
- **chaos**: a random worker SIGKILLed or SIGTERMed every 10-30 s and a replacement started.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.soak_checks import document_violations
from bench.soak_ledger import FINAL, DeleteRound, DocWrite, JobEntry, Ledger
from bench.soak_stack import Workers

DOCUMENTS = 4  # per avatar, besides the anchor (always true, so a job always has data)
# Conversations per document: few, so that a job is a few seconds of steps (and checkpoints).
CONVERSATIONS = 2
ANCHOR = "anchor.jsonl"
POLL_SECONDS = 0.5
# The jobs an avatar's loop creates, in turn (each avatar starts at another place in the cycle).
JOB_MIX = ("train", "train", "train", "fuse", "train", "train", "train", "generate")

CREATED = frozenset({202})
OK = frozenset({200})
WRITTEN = frozenset({200, 201})


def chat_document(n: int, seed: str) -> bytes:
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"{seed} question {i}: how was your day?"},
                    {"role": "assistant", "content": f"{seed} answer {i}: a long walk, then coffee."},
                ]
            }
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


class Api:
    """One user's HTTP client for one avatar; a connection pool per thread, answers counted."""

    def __init__(self, url: str, token: str, user_id: str, avatar_id: str, ledger: Ledger) -> None:
        self._url = url
        self._token = token
        self._local = threading.local()
        self.ledger = ledger
        self.user_id = user_id
        self.avatar_id = avatar_id
        self.base = f"/v1/users/{user_id}/avatars/{avatar_id}"

    @property
    def avatar(self) -> str:
        return f"{self.user_id}/{self.avatar_id}"

    def _client(self) -> httpx.Client:
        if not hasattr(self._local, "client"):
            headers = {"Authorization": f"Bearer {self._token}"}
            self._local.client = httpx.Client(base_url=self._url, headers=headers, timeout=120)
        return self._local.client

    def call(self, op: str, method: str, path: str, expected: frozenset[int], **kwargs: Any) -> httpx.Response | None:
        """The answer (counted in the ledger, kept there when not `expected`), None when none came."""
        try:
            r = self._client().request(method, self.base + path, **kwargs)
        except httpx.HTTPError as exc:
            self.ledger.response(op, type(exc).__name__, expected, str(exc)[:200])
            return None
        self.ledger.response(op, r.status_code, expected, r.text[:300] if r.status_code not in expected else "")
        return r

    def job(self, job_id: str) -> dict[str, Any] | None:
        r = self.call("get job", "GET", f"/training-jobs/{job_id}", OK)
        return r.json() if r is not None and r.status_code == 200 else None

    def jobs(self) -> list[dict[str, Any]]:
        """Every job of the avatar (all pages)."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            r = self.call("list jobs", "GET", "/training-jobs", OK, params=params)
            if r is None or r.status_code != 200:
                return items
            items += r.json()["items"]
            cursor = r.json().get("next_cursor")
            if not cursor:
                return items


class AvatarDriver:
    """The load on one avatar: its job loop, writer and deleter (module doc)."""

    def __init__(self, api: Api, s3: Any, bucket: str, seed: int, churn: bool = True) -> None:
        self.api = api
        self.churn = churn  # False: a calm avatar, its documents never change (jobs resume from checkpoints)
        self.ledger = api.ledger
        self._s3 = s3
        self._bucket = bucket
        self._seed = seed
        self.names = [f"doc-{i}.jsonl" for i in range(DOCUMENTS)]
        self._content = {name: chat_document(CONVERSATIONS, f"{api.avatar} {name}") for name in self.names}
        self._locks = {name: threading.Lock() for name in self.names}
        self.last: dict[str, DocWrite] = {}  # each document's last write, under its lock

    def setup(self) -> None:
        """The anchor (flagged true, never touched again) and the documents, half of them true."""
        self.api.call(
            "put document",
            "PUT",
            f"/training-data/{ANCHOR}",
            WRITTEN,
            content=chat_document(2 * CONVERSATIONS, "anchor"),
        )
        for i, name in enumerate(self.names):
            self.write(name, "put", i % 2 == 0)

    def threads(self, stop: threading.Event) -> list[threading.Thread]:
        loops: list[Callable[[threading.Event, random.Random], None]] = [self.jobs_loop]
        if self.churn:
            loops += [self.writer_loop, self.deleter_loop]
        return [
            threading.Thread(target=loop, args=(stop, random.Random(self._seed * 10 + i)), daemon=True)
            for i, loop in enumerate(loops)
        ]

    # -- documents --------------------------------------------------------------------------

    def write(self, name: str, op: str, flag: bool) -> DocWrite:
        """PATCH the flag, or PUT the document's bytes again with the flag; recorded."""
        with self._locks[name]:
            sent = self.ledger.now()
            if op == "patch":
                expected = frozenset({200, 404})
                r = self.api.call(
                    "patch flag", "PATCH", f"/training-data/{name}", expected, json={"use_for_training": flag}
                )
            else:
                params = {"use_for_training": str(flag).lower()}
                r = self.api.call(
                    "re-upload", "PUT", f"/training-data/{name}", WRITTEN, content=self._content[name], params=params
                )
            status = None if r is None else r.status_code
            write = DocWrite(self.api.avatar, name, op, flag, sent, self.ledger.now(), status)
            self.last[name] = write
            self.ledger.write(write)
            return write

    def writer_loop(self, stop: threading.Event, rng: random.Random) -> None:
        while not stop.wait(rng.uniform(0.5, 1.5)):
            op = rng.choices(("patch", "put"), weights=(7, 3))[0]
            self.write(rng.choice(self.names), op, rng.random() < 0.5)

    def deleter_loop(self, stop: threading.Event, rng: random.Random) -> None:
        with ThreadPoolExecutor(3, thread_name_prefix="racer") as pool:
            while not stop.wait(rng.uniform(3, 6)):
                self.delete_round(pool, rng)
                self.check_round()

    def delete_round(self, pool: ThreadPoolExecutor, rng: random.Random) -> None:
        """A delete-unused with writes flagging unused documents true sent while it runs."""
        unused = [name for name in self.names if name in self.last and not self.last[name].flagged_true]
        started = self.ledger.now()
        deleting = pool.submit(
            self.api.call, "delete unused", "DELETE", "/training-data", OK, params={"use_for_training": "false"}
        )
        racing = [
            pool.submit(self.write, name, rng.choice(("patch", "put")), True)
            for name in rng.sample(unused, min(2, len(unused)))
        ]
        r = deleting.result()
        for f in racing:
            f.result()
        deleted = r.json()["deleted"] if r is not None and r.status_code == 200 else None
        self.ledger.delete_round(DeleteRound(self.api.avatar, started, self.ledger.now(), deleted))

    @contextmanager
    def _quiet(self) -> Iterator[None]:
        """No write of this avatar's documents in flight (every document's lock held)."""
        with ExitStack() as held:
            for name in self.names:
                held.enter_context(self._locks[name])
            yield

    def check_round(self, when: str = "after a delete-unused") -> None:
        with self._quiet():
            checked, violations = document_violations(self._s3, self._bucket, dict(self.last), when)
        self.ledger.round_checks += checked
        for v in violations:
            self.ledger.violation(v)

    # -- jobs -------------------------------------------------------------------------------

    def create_job(self, kind: str, rng: random.Random, probe: bool = False) -> dict[str, Any] | None:
        """POST a job of `kind` (train, fuse, generate); its view when the API took it."""
        if kind == "train":
            path = "/training-jobs"
            body: dict[str, Any] = {"num_epochs": rng.randint(2, 6), "batch_size": rng.randint(1, 4)}
            expected = CREATED if probe else frozenset({202, 409})
        else:  # 404: the avatar has no adapter yet
            path = "/fuse-jobs" if kind == "fuse" else "/generations"
            body = {} if kind == "fuse" else {"prompt": "how was your day?", "max_new_tokens": 8}
            expected = frozenset({202, 404, 409})
        r = self.api.call(f"create {kind} job", "POST", path, expected, json=body)
        if r is None or r.status_code != 202:
            return None
        view = r.json()
        entry = JobEntry(view["id"], self.api.user_id, self.api.avatar_id, view["type"], self.ledger.now(), probe)
        self.ledger.job(entry)
        return view

    def watch(self, job_id: str, stop: threading.Event) -> dict[str, Any] | None:
        """Poll the job until it is final (None when `stop` came first)."""
        while not stop.wait(POLL_SECONDS):
            view = self.api.job(job_id)
            if view is not None and view["status"] in FINAL:
                return view
        return None

    def jobs_loop(self, stop: threading.Event, rng: random.Random) -> None:
        kinds = itertools.cycle(JOB_MIX[self._seed % len(JOB_MIX) :] + JOB_MIX[: self._seed % len(JOB_MIX)])
        while not stop.is_set():
            kind = next(kinds)
            view = self.create_job(kind, rng)
            if view is not None:
                if kind == "train" and rng.random() < 0.1 and not stop.wait(rng.uniform(0, 4)):
                    self.api.call("cancel job", "POST", f"/training-jobs/{view['id']}/cancel", frozenset({202, 409}))
                self.watch(view["id"], stop)
            stop.wait(rng.uniform(0.5, 2.0))


class Promoter(threading.Thread):
    """Every 1-3 s: promotes of `width` kept versions of one avatar, sent at the same time."""

    def __init__(self, drivers: list[AvatarDriver], stop: threading.Event, seed: int, width: int = 3) -> None:
        super().__init__(daemon=True, name="promoter")
        self._drivers = drivers
        self._halt = stop
        self._rng = random.Random(seed)
        self._width = width

    def run(self) -> None:
        with ThreadPoolExecutor(self._width, thread_name_prefix="promote") as pool:
            while not self._halt.wait(self._rng.uniform(1, 3)):
                self.promote_round(pool, self._rng.choice(self._drivers).api)

    def promote_round(self, pool: ThreadPoolExecutor, api: Api) -> None:
        r = api.call("list versions", "GET", "/adapter/versions", OK)
        versions = [v["version"] for v in r.json()["items"]] if r is not None and r.status_code == 200 else []
        if not versions:
            return
        expected = frozenset({200, 404, 409})  # 404: pruned meanwhile; 409: the lock stayed busy

        def promote(version: int) -> None:
            api.call("promote", "POST", f"/adapter/versions/{version}/promote", expected)

        list(pool.map(promote, [self._rng.choice(versions) for _ in range(self._width)]))


class Chaos(threading.Thread):
    """Every 10-30 s: SIGKILL or SIGTERM (even odds) one healthy worker; keep `count` healthy."""

    def __init__(self, workers: Workers, count: int, stop: threading.Event, seed: int) -> None:
        super().__init__(daemon=True, name="chaos")
        self._workers = workers
        self._journal = workers.logs / "chaos.log"  # when which worker got which signal
        self._count = count
        self._halt = stop
        self._rng = random.Random(seed)
        self.kills: Counter[str] = Counter()

    def run(self) -> None:
        while not self._halt.wait(self._rng.uniform(10, 30)):
            healthy = self._workers.healthy()
            if healthy:
                sig = self._rng.choice((signal.SIGKILL, signal.SIGTERM))
                victim = self._rng.choice(healthy)
                self._workers.kill(victim, sig)
                self.kills[sig.name] += 1
                with open(self._journal, "a") as journal:
                    journal.write(
                        f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {sig.name} {victim.worker_id}\n"
                    )
            self._workers.keep(self._count)
            self._workers.reap()
