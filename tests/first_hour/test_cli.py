"""The `avatune` command line, driven with typer's CliRunner against the real stack: a uvicorn
API on moto and a real trainer worker (this module's own queues)."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from tests.conftest import TEST_SECRET, free_port, token_for
from tests.pipeline import Pipeline, chat_document

runner = CliRunner()

# Keep the caller's AVATUNE_* settings out of the tests, and make rich tables wide enough.
BASE_ENV = {
    "COLUMNS": "200",
    "AVATUNE_API_URL": None,
    "AVATUNE_TOKEN": None,
    "AVATUNE_USER": None,
    "AVATUNE_AVATAR": None,
    "AVATUNE_PRESIGN_OVER": None,
    "AVATUNE_DEBUG": None,
}
FAST = ["--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--r", "4", "--interval", "0.2", "--timeout", "150"]


@dataclass
class Cli:
    api_url: str
    user: str
    avatar: str = "avatar-1"

    @property
    def token(self) -> str:
        return token_for(self.user)

    def __call__(
        self, *args: str, env: dict[str, str | None] | None = None, globals_: list[str] | None = None
    ) -> Result:
        head = (
            globals_
            if globals_ is not None
            else ["--api-url", self.api_url, "--token", self.token, "--avatar", self.avatar]
        )
        return runner.invoke(app, [*head, *args], env={**BASE_ENV, **(env or {})})


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (
        f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
    )
    return result


def failed(result: Result, *needles: str) -> Result:
    assert result.exit_code == 1, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result


def new_cli(pipeline: Pipeline) -> Cli:
    return Cli(pipeline.api_url, "u-" + uuid.uuid4().hex[:10])


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline):
    proc = pipeline.start_worker()
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()
    # Idle by now. SIGTERM should end its long poll at once, but it can sit out the whole
    # 20 s poll first; nothing is left to lose, so do not wait for it.
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def cli(pipeline: Pipeline) -> Cli:
    return new_cli(pipeline)


@pytest.fixture(scope="module")
def trained(pipeline: Pipeline, worker, tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, Result]:
    """An avatar trained once through `avatune train --follow`, and that command's result."""
    cli = new_cli(pipeline)
    doc = tmp_path_factory.mktemp("train") / "chat.jsonl"
    doc.write_bytes(chat_document(40))
    ok(cli("docs", "upload", str(doc)))
    return cli, cli("train", "--follow", *FAST, "--set", "seed=7")


# -- documents -------------------------------------------------------------------------------


def test_docs_upload_list_flag_download_rm_clean(cli: Cli, tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(chat_document(5))
    notes = tmp_path / "notes.txt"
    notes.write_text("First paragraph.\n\nSecond one.\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("not for training\n")

    out = ok(cli("docs", "upload", str(chat), str(notes))).stdout
    assert "uploaded chat.jsonl" in out and "uploaded notes.txt" in out and "used for training" in out
    assert "not used for training" in ok(cli("docs", "upload", "--no-train", str(extra))).stdout

    # One document a page: the listing follows next_cursor to the end.
    out = ok(cli("docs", "list", "--page-size", "1")).stdout
    assert all(n in out for n in ("chat.jsonl", "notes.txt", "extra.txt"))
    assert "3 documents, 2 used for training" in out
    out = ok(cli("docs", "list", "--unused")).stdout
    assert "extra.txt" in out and "chat.jsonl" not in out and "1 document, 0 used" in out

    assert "notes.txt: not used for training" in ok(cli("docs", "flag", "notes.txt", "--off")).stdout
    out = ok(cli("docs", "list", "--used")).stdout
    assert "chat.jsonl" in out and "notes.txt" not in out and "extra.txt" not in out
    assert "extra.txt: used for training" in ok(cli("docs", "flag", "extra.txt", "--on")).stdout
    ok(cli("docs", "flag", "extra.txt", "--off"))

    ok(cli("docs", "download", "chat.jsonl", "-o", str(tmp_path / "copy.jsonl")))
    assert (tmp_path / "copy.jsonl").read_bytes() == chat.read_bytes()
    assert ok(cli("docs", "download", "notes.txt", "-o", "-")).stdout_bytes == notes.read_bytes()

    ok(cli("docs", "download", "--archive", "-o", str(tmp_path / "used.zip")))
    with zipfile.ZipFile(tmp_path / "used.zip") as z:
        assert z.namelist() == ["chat.jsonl"] and z.read("chat.jsonl") == chat.read_bytes()
    archive = ok(cli("docs", "download", "--archive", "--which", "all", "-o", "-")).stdout_bytes
    assert sorted(zipfile.ZipFile(io.BytesIO(archive)).namelist()) == ["chat.jsonl", "extra.txt", "notes.txt"]
    failed(cli("docs", "download"), "either a document NAME or --archive")

    assert "deleted extra.txt" in ok(cli("docs", "rm", "extra.txt")).stdout
    assert "deleted 1 document not used for training" in ok(cli("docs", "clean")).stdout  # notes.txt
    out = ok(cli("docs", "list")).stdout
    assert "chat.jsonl" in out and "notes.txt" not in out and "1 document, 1 used" in out
    assert "deleted 0 documents" in ok(cli("docs", "clean")).stdout


def test_docs_upload_large_files_go_through_a_presigned_url(cli: Cli, api_url: str, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(chat_document(30))
    # Over the CLI's threshold: straight to the presigned route.
    out = ok(cli("docs", "upload", "--no-train", "--presign-over", "100", str(big))).stdout
    assert "uploaded big.jsonl" in out and "presigned" in out
    listed = ok(cli("docs", "list", "--unused")).stdout
    assert "big.jsonl" in listed
    assert ok(cli("docs", "download", "big.jsonl", "-o", "-")).stdout_bytes == big.read_bytes()

    # Under the threshold but over the server's MAX_UPLOAD_BYTES (256 KiB on the `api_url`
    # server): the API answers 413 and the CLI goes around it.
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(chat_document(3000))
    assert huge.stat().st_size > 256 * 1024
    other = Cli(api_url, cli.user)
    out = ok(other("docs", "upload", str(huge))).stdout
    assert "uploaded huge.jsonl" in out and "too large for the API" in out
    assert "huge.jsonl" in ok(other("docs", "list", "--used")).stdout


def test_api_errors_print_the_detail_and_exit_1(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": oops}\n')
    good = tmp_path / "good.jsonl"
    good.write_bytes(chat_document(2))
    # The bad file is reported, the good one still uploaded, and the exit code says it failed.
    result = failed(cli("docs", "upload", str(bad), str(good)), "error 422", "bad.jsonl", "line 1")
    assert "uploaded good.jsonl" in result.stdout
    failed(cli("docs", "rm", "missing.txt"), "error 404: no training document named 'missing.txt'")
    failed(cli("jobs", "show", "no-such-job"), "error 404")
    # Another user's data: 403 from the API.
    failed(
        cli(
            "--user",
            "someone-else",
            "docs",
            "list",
            globals_=["--api-url", cli.api_url, "--token", cli.token, "--avatar", cli.avatar],
        ),
        "error 403",
    )


def test_train_needs_a_flagged_document(cli: Cli) -> None:
    failed(cli("train"), "error 409", "no document with use_for_training=true")


def test_missing_settings_are_reported(cli: Cli) -> None:
    failed(cli("docs", "list", globals_=["--api-url", cli.api_url]), "no token")
    failed(cli("docs", "list", globals_=["--api-url", cli.api_url, "--token", cli.token]), "needs an avatar")
    failed(
        cli("docs", "list", globals_=["--api-url", cli.api_url, "--token", "not-a-jwt", "--avatar", "a"]),
        "cannot read the user from the token",
    )
    failed(
        cli("docs", "list", globals_=["--api-url", "localhost:8000", "--token", cli.token, "--avatar", "a"]),
        "--api-url must start with http://",
    )
    # Settings from the environment work the same as options.
    env = {"AVATUNE_API_URL": cli.api_url, "AVATUNE_TOKEN": cli.token, "AVATUNE_AVATAR": cli.avatar}
    assert "no documents" in ok(cli("docs", "list", env=env, globals_=[])).stdout


def test_connection_error_is_one_line(pipeline: Pipeline) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    cli = Cli(url, "u-offline")
    result = failed(cli("docs", "list"), f"cannot reach API at {url}")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_fuse_without_an_adapter_reports_the_servers_404(cli: Cli) -> None:
    # The server has the route now: its problem detail is shown, not "not supported".
    failed(cli("fuse"), "error 404", "no trained adapter")
    failed(cli("fuse", "--version", "2"), "error 404", "no trained adapter")


# -- training, jobs, adapter -----------------------------------------------------------------


def test_train_follow_runs_to_completion(pipeline: Pipeline, trained: tuple[Cli, Result]) -> None:
    cli, result = trained
    assert result.exit_code == 0, f"{result.output}\n{pipeline.worker_log()}"
    out = result.stdout
    assert re.search(r"job \S+ queued", out)
    assert "succeeded: adapter version 1" in out
    # The live progress bar's final frame: steps done of the total, the loss and the eta.
    steps = re.search(r"(\d+)/(\d+)\s+loss (\S+)\s+eta (\S+)", out)
    assert steps, out
    assert steps.group(1) == steps.group(2) and int(steps.group(2)) > 0 and steps.group(3) != "-"
    assert "━" in out  # the bar itself
    assert "metrics" in out and "trainable_tokens" in out


def test_jobs_list_show_cancel(trained: tuple[Cli, Result]) -> None:
    cli, _ = trained
    job_id = re.search(r"job (\S+) queued", trained[1].stdout).group(1)
    out = ok(cli("jobs", "list")).stdout
    assert job_id in out and "succeeded" in out
    out = ok(cli("jobs", "list", "--all-avatars", globals_=["--api-url", cli.api_url, "--token", cli.token])).stdout
    assert job_id in out and cli.avatar in out
    out = ok(cli("jobs", "show", job_id)).stdout
    assert job_id in out and "succeeded" in out and "chat.jsonl" in out
    assert re.search(r"adapter version\s+1", out) and "num_epochs=2" in out and "seed=7" in out
    assert "eval_loss_after" in out
    failed(cli("jobs", "cancel", job_id), "error 409", "already ended")
    # Following a finished job ends at once with its outcome.
    assert "adapter version 1" in ok(cli("jobs", "follow", job_id, "--interval", "0.05")).stdout


def test_adapter_show_download_versions_promote_config(trained: tuple[Cli, Result], tmp_path: Path) -> None:
    cli, _ = trained
    out = ok(cli("adapter", "show")).stdout
    assert re.search(r"current version\s+1", out) and "adapter_model.safetensors" in out and "config" in out

    dest = tmp_path / "adapter"
    out = ok(cli("adapter", "download", "-o", str(dest))).stdout
    names = sorted(p.name for p in dest.iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names, names
    assert not [n for n in names if n.endswith(".part")]
    assert json.loads((dest / "adapter_config.json").read_text())["r"] == 4
    assert f"adapter version 1: {len(names)} file(s)" in out

    out = ok(cli("adapter", "versions")).stdout
    assert re.search(r"\*\W+1\s", out), out
    assert "adapter version 1 is current" in ok(cli("adapter", "promote", "1")).stdout
    failed(cli("adapter", "promote", "9"), "error 404", "no complete adapter version 9")

    out = ok(cli("adapter", "config", "--r", "8", "--target-modules", "q_proj,v_proj", "--set", "lora_alpha=64")).stdout
    assert "updated lora_alpha=64, r=8, target_modules=q_proj, v_proj" in out
    assert re.search(r"\br\s+8\b", ok(cli("adapter", "config")).stdout)
    failed(cli("adapter", "config", "--r", "0"), "error 422")
    failed(cli("adapter", "config", "--set", "no_such_field=1"), "error 422")
    failed(cli("adapter", "config", "--set", "oops"), "--set expects KEY=VALUE")
    assert cli.avatar in ok(cli("adapter", "list", globals_=["--api-url", cli.api_url, "--token", cli.token])).stdout


def test_export_wait_list_and_download_an_export(trained: tuple[Cli, Result], tmp_path: Path) -> None:
    cli, _ = trained
    assert "no exports" in ok(cli("adapter", "exports")).stdout
    job = json.loads(ok(cli("export", "--format", "gguf", "--json")).stdout)
    assert job["type"] == "export" and job["request"]["format"] == "gguf"
    assert json.loads(ok(cli("jobs", "wait", job["id"], "--json")).stdout)["status"] == "succeeded"

    listed = ok(cli("adapter", "exports")).stdout
    assert re.search(r"\b1\s+gguf\b", listed) and "llama_cpp: ok" in listed, listed
    dest = tmp_path / "gguf"
    out = ok(cli("adapter", "download", "--export", "gguf", "-o", str(dest))).stdout
    assert "gguf export of adapter version 1" in out
    data = (dest / "adapter.gguf").read_bytes()
    assert data[:4] == b"GGUF"  # the file llama.cpp loads with --lora
    exports = json.loads(ok(cli("adapter", "exports", "--json")).stdout)
    assert [(e["adapter_version"], e["format"]) for e in exports] == [(1, "gguf")]

    failed(cli("adapter", "download", "--export", "peft"), "error 404", "no peft export of adapter version 1")
    failed(cli("adapter", "download", "--version", "1"), "--version goes with --export")
    for args in (["export", "--format", "onnx"], ["adapter", "download", "--export", "../x"]):
        refused = cli(*args)  # a usage error: nothing sent, nothing written outside the directory
        assert refused.exit_code == 2 and "is not one of 'gguf'" in refused.output, refused.output


def test_train_follow_exits_1_when_the_job_fails(pipeline: Pipeline, worker, trained, tmp_path: Path) -> None:
    cli = new_cli(pipeline)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": oops}\n')
    # Presigned uploads are not validated on the way in; the trainer refuses the document.
    ok(cli("docs", "upload", "--presign-over", "0", str(broken)))
    result = cli("train", "--follow", *FAST)
    assert result.exit_code == 1, result.output
    assert "failed" in result.stderr and "broken.jsonl" in result.stderr
    job_id = re.search(r"job (\S+) queued", result.stdout).group(1)
    waited = failed(cli("jobs", "wait", job_id, "--interval", "0.05"), "failed")
    assert f"train job {job_id} failed: " in waited.stderr and "broken.jsonl" in waited.stderr


def test_json_output_jobs_wait_and_ids_that_never_wrap(trained: tuple[Cli, Result]) -> None:
    cli, result = trained
    job_id = re.search(r"job (\S+) queued", result.stdout).group(1)
    shown = json.loads(ok(cli("jobs", "show", job_id, "--json")).stdout)
    assert shown["id"] == job_id and shown["status"] == "succeeded" and shown["metrics"]["eval_loss_after"] is not None
    assert [j["id"] for j in json.loads(ok(cli("jobs", "list", "--json")).stdout)][-1] == job_id
    out = ok(cli("jobs", "wait", job_id, job_id, "--interval", "0.05")).stdout
    assert out.count(f"train job {job_id} succeeded: adapter version 1") == 2
    waited = ok(cli("jobs", "wait", job_id, "--json"))
    assert json.loads(waited.stdout)["status"] == "succeeded"  # stdout holds the JSON alone
    assert json.loads(ok(cli("adapter", "versions", "--json")).stdout)[0]["job_id"] == job_id
    assert json.loads(ok(cli("adapter", "show", "--json")).stdout)["current_version"] == 1
    assert [d["name"] for d in json.loads(ok(cli("docs", "list", "--json")).stdout)] == ["chat.jsonl"]
    failed(cli("jobs", "wait", "job-0000000000000-00000000"), "error 404")
    # However narrow the terminal, an id stays whole on one line, ready to copy.
    for args in (("jobs", "list"), ("adapter", "versions")):
        for columns in ("80", "50"):
            out = ok(cli(*args, env={"COLUMNS": columns})).stdout
            assert any(job_id in line for line in out.splitlines()), (args, columns, out)


# -- tokens ----------------------------------------------------------------------------------


def test_token(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    token = ok(runner.invoke(app, ["token", "alice"], env=BASE_ENV)).stdout.strip()
    assert jwt.decode(token, TEST_SECRET, algorithms=["HS256"])["sub"] == "alice"
    service = ok(runner.invoke(app, ["token", "svc", "--service"], env=BASE_ENV)).stdout.strip()
    assert jwt.decode(service, TEST_SECRET, algorithms=["HS256"])["role"] == "service"

    # The minted token works, and names the user when --user is not given.
    user = "u-" + uuid.uuid4().hex[:10]
    minted = ok(runner.invoke(app, ["token", user], env=BASE_ENV)).stdout.strip()
    assert (
        "no documents"
        in ok(
            runner.invoke(
                app, ["--api-url", pipeline.api_url, "--token", minted, "--avatar", "a1", "docs", "list"], env=BASE_ENV
            )
        ).stdout
    )

    # No secret in this shell: like handlers.devtoken, a token for a DEV_MODE server, with a warning.
    result = ok(runner.invoke(app, ["token", "alice"], env={**BASE_ENV, "AUTH_JWT_SECRET": None, "DEV_MODE": None}))
    assert "public dev secret" in result.stderr
    from handlers.settings import DEV_JWT_SECRET

    assert jwt.decode(result.stdout.strip(), DEV_JWT_SECRET, algorithms=["HS256"])["sub"] == "alice"
    monkeypatch.setitem(sys.modules, "handlers.auth", None)  # the API package is not installed
    failed(runner.invoke(app, ["token", "alice"], env=BASE_ENV), "needs the API package")


def test_follow_timeout_leaves_the_job_running_and_cancel(pipeline: Pipeline, worker, trained, tmp_path: Path) -> None:
    cli = new_cli(pipeline)
    doc = tmp_path / "chat.jsonl"
    doc.write_bytes(chat_document(2))
    ok(cli("docs", "upload", str(doc)))
    result = failed(
        cli("train", "--follow", "--timeout", "0", "--epochs", "50", "--batch-size", "1"),
        "stopped following",
        "avatune jobs follow",
    )
    job_id = re.search(r"job (\S+) queued", result.stdout).group(1)
    out = ok(cli("jobs", "cancel", job_id)).stdout
    assert f"job {job_id} cancelled" in out or "cancel requested" in out
    done = ok(cli("jobs", "show", job_id)).stdout if "cancelled" in out else None
    if done is None:  # running: the trainer stops at its next step
        result = cli("jobs", "follow", job_id, "--interval", "0.2", "--timeout", "60")
        assert result.exit_code == 1 and "cancelled" in result.stderr, result.output


def test_unexpected_errors_are_one_line_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.client import AvatuneClient

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(AvatuneClient, "iter_documents", boom)
    cli = Cli("http://127.0.0.1:9", "u-x")
    failed(cli("docs", "list"), "unexpected error: RuntimeError: boom")
    with pytest.raises(RuntimeError):  # AVATUNE_DEBUG=1: the real exception, for a traceback
        result = cli("docs", "list", env={"AVATUNE_DEBUG": "1"})
        raise result.exception


# -- feedback --------------------------------------------------------------------------------


def test_feedback_rate_correct_list_delete_and_train_with_an_objective(
    pipeline: Pipeline, worker, trained: tuple[Cli, Result]
) -> None:
    cli = trained[0]
    generated = ok(cli("generate", "--max-new-tokens", "6", "--interval", "0.2", "--timeout", "120", "question 3: hi"))
    generation_id = re.search(r"generation job (job-[0-9a-f-]+)", generated.stderr).group(1)
    out = ok(cli("feedback", "correct", generation_id, "great, thanks for asking")).stdout
    assert "pair (chosen over rejected)" in out
    assert "rated up" in ok(cli("feedback", "rate", "--prompt", "question 1", "--reply", "great, thanks", "up")).stdout
    out = ok(cli("feedback", "correct", "--prompt", "question 2", "--rejected", "go away", "great, thanks")).stdout
    first_id = re.search(r"feedback (feedback-[0-9a-f-]+)", out).group(1)
    out = ok(cli("feedback", "list")).stdout
    assert out.index(first_id) < out.index(generation_id)  # newest first
    assert "rated up" in out and out.count("pair") == 2

    failed(cli("feedback", "rate", "--prompt", "q", "--reply", "a", "sideways"), "up or down")
    failed(cli("feedback", "rate", generation_id, "up", "--prompt", "q"), "not both")
    failed(cli("feedback", "correct", "--prompt", "q", "--rejected", "same", "same"), "error 422", "same reply")
    failed(cli("train", "--beta", "0.2"), "--objective dpo or kto")

    result = ok(
        cli(
            "train",
            "--objective",
            "dpo",
            "--beta",
            "0.2",
            "--set",
            'preference={"learning_rate": 0.005}',
            "--follow",
            *FAST,
        )
    )
    assert "succeeded" in result.stdout and "preference_accuracy" in result.stdout and "dpo" in result.stdout
    ok(cli("feedback", "delete", first_id))
    assert first_id not in ok(cli("feedback", "list")).stdout
    failed(cli("feedback", "delete", first_id), "error 404")
