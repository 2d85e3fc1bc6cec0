"""The README's Quickstart is executable documentation: its shell blocks, extracted from
README.md, run as written (one bash, top to bottom, `set -euo pipefail`) against a fresh stack
started the way `make dev` starts it (`python -m infra.devstack`), on free ports, from a fresh
directory laid out like the repository root (`.venv` beside it). Then what a newcomer sees in the
`make dev` terminal: one ready line, readable log lines, no library warnings, a quiet Ctrl-C.
Also: `make dev` refuses a port in use before it starts anything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from contracts.results import GenerationResult, IndexResult, RetrievalResult
from tests.conftest import ROOT, free_port

README = ROOT / "README.md"
RESULT_TYPES = {"generate": GenerationResult, "index": IndexResult, "retrieve": RetrievalResult}


def quickstart_blocks(readme: str) -> list[str]:
    """The ```sh blocks between `## Quickstart` and the next `## ` heading, in order."""
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M)


def clean_env(**extra: str) -> dict[str, str]:
    """A fresh shell's environment: none of the suite's AWS, auth or AVATUNE_* settings."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TMPDIR") if k in os.environ}
    # This checkout's code, whichever checkout the shared virtualenv was installed from.
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def read_until(proc: subprocess.Popen, log: Path, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if re.search(pattern, text, flags=re.M):
            return text
        assert proc.poll() is None, f"make dev exited with {proc.returncode}:\n{text[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def port_listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_quickstart_blocks_are_complete() -> None:
    blocks = quickstart_blocks(README.read_text())
    assert len(blocks) >= 8
    script = "\n".join(blocks)
    for placeholder in ("<url>", "<job-id>", "<train-job-id>", "JOB_ID"):
        assert placeholder not in script  # nothing for the reader to fill in by hand
    assert "avatune jobs wait" in script and "--json" in script


@pytest.mark.slow
def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    api_port, hook_port = free_port(), free_port()
    stack_env = clean_env(
        HOME=str(tmp_path),
        PORT=str(api_port),
        MOTO_PORT=str(free_port()),
        METRICS_PORT=str(free_port()),
        DEV_DIR=str(tmp_path / "dev"),
    )
    log = tmp_path / "make-dev.log"
    with open(log, "wb") as out:
        stack = subprocess.Popen(
            [sys.executable, "-m", "infra.devstack"],
            cwd=ROOT,
            env=stack_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a terminal: Ctrl-C reaches it as SIGINT below
        )
    try:
        read_until(stack, log, r"^avatune: ready in", timeout=300)
        checkout = tmp_path / "checkout"  # the reader's repository root: the script makes its files here
        checkout.mkdir()
        (checkout / ".venv").symlink_to(ROOT / ".venv")
        script = "set -euo pipefail\n" + "\n".join(quickstart_blocks(README.read_text()))
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=checkout,
            env=clean_env(HOME=str(tmp_path), PORT=str(api_port), HOOK_PORT=str(hook_port), COLUMNS="80"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"stdout:\n{done.stdout[-5000:]}\nstderr:\n{done.stderr[-5000:]}"
        check_what_the_quickstart_made(checkout / "quickstart", done.stdout, api_port)
    finally:
        if stack.poll() is None:
            os.kill(stack.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
        code = stack.wait(90)
    text = log.read_text(errors="replace")
    check_the_make_dev_terminal(text, code)
    assert not port_listens(api_port), "the API outlived make dev"


def check_what_the_quickstart_made(files: Path, stdout: str, api_port: int) -> None:
    # The first adapter trained on enough examples for the comparison to show something.
    samples = json.loads(re.search(r"^\{\n  \"reference\".*?^\}", stdout, flags=re.S | re.M).group(0))
    assert samples["reference"] and samples["base"] is not None and samples["adapter"] is not None
    assert (files / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (files / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    deliveries = (files / "deliveries.txt").read_text()
    assert "job.succeeded" in deliveries and "[signature ok]" in deliveries and "authorization: present" in deliveries
    assert "The museum opens at 9 on weekdays." in stdout
    # Every job the Quickstart ran succeeded, the first with a real eval loss and loss curve;
    # results have no field their documented type lacks (contracts/results.py).
    token = subprocess.run(
        [sys.executable, "-m", "handlers.devtoken", "alice"], cwd=ROOT, env=clean_env(), capture_output=True, text=True
    ).stdout.strip()
    jobs = httpx.get(
        f"http://127.0.0.1:{api_port}/v1/users/alice/avatars/my-avatar/training-jobs",
        headers={"Authorization": f"Bearer {token}"},
        params={"limit": 100},
    ).json()["items"]
    assert [j["type"] for j in reversed(jobs)] == [
        "train", "generate", "generate", "fuse", "train", "index", "retrieve", "generate"
    ]  # fmt: skip
    assert all(j["status"] == "succeeded" for j in jobs), [(j["type"], j["status"], j["error"]) for j in jobs]
    first = jobs[-1]["metrics"]
    assert first["eval_examples"] >= 3 and first["eval_loss_after"] is not None
    assert len(first["loss_curve"]["eval"]) >= 3 and first["samples"] >= 3 and first["method"] == "lora"
    for job in jobs:
        if job["type"] in RESULT_TYPES:
            result = RESULT_TYPES[job["type"]].model_validate(job["result"])
            assert not result.model_extra, (job["type"], sorted(result.model_extra or {}))


def check_the_make_dev_terminal(text: str, code: int) -> None:
    assert code == 0, text[-3000:]
    assert len(re.findall(r"^avatune: ready in", text, flags=re.M)) == 1
    assert text.rstrip().endswith("avatune: stopped"), text[-2000:]
    for noise in ("Traceback", "KeyboardInterrupt", "Warning:", "warnings.warn"):
        assert noise not in text, (noise, text[-4000:])
    # One readable format: every line is ours (`HH:MM:SS.mmm service level message`), never JSON.
    for line in text.splitlines():
        if line and not line.startswith(("avatune: ", " ", "\t")):
            assert re.match(r"^\d\d:\d\d:\d\d\.\d{3} (api|trainer|events) +\w+ ", line), line


def test_make_dev_refuses_a_port_in_use_and_names_it(tmp_path: Path) -> None:
    api_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        env = clean_env(HOME=str(tmp_path), PORT=str(api_port), MOTO_PORT=str(busy), DEV_DIR=str(tmp_path / "dev"))
        env["METRICS_PORT"] = "0"
        done = subprocess.run(
            [sys.executable, "-m", "infra.devstack"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert f"port {busy} (MOTO_PORT, the embedded S3+SQS (moto)) is already in use" in done.stdout, done.stdout
    assert f"make dev MOTO_PORT={busy + 1}" in done.stdout
    assert not port_listens(api_port) and not (tmp_path / "dev").exists()  # nothing was started
    same = clean_env(HOME=str(tmp_path), PORT=str(api_port), MOTO_PORT=str(api_port), METRICS_PORT="0")
    done = subprocess.run([sys.executable, "-m", "infra.devstack"], cwd=ROOT, env=same, capture_output=True, text=True)
    assert done.returncode == 1 and "MOTO_PORT and PORT are both" in done.stdout, done.stdout


def test_make_dev_defaults_behave_like_a_clients_setup(tmp_path: Path) -> None:
    from contracts.sealing import job_context, sealer_from_env
    from infra.devstack import local_defaults

    # With a secret of one's own (no DEV_MODE), a webhook's auth_header can still be sealed.
    env = {"AUTH_JWT_SECRET": "mine"}
    local_defaults(env, tmp_path)
    assert "DEV_MODE" not in env and env["CALLBACK_SEALER"] == "local"
    context = job_context("alice", "a1", "job-1")
    sealer = sealer_from_env(env)  # what the API, the worker and the events consumer build from it
    assert sealer is not None and sealer.name == "local"
    assert sealer.unseal(sealer.seal("Token s3cr3t", context), context) == "Token s3cr3t"
    assert env["DEFAULT_METHOD"] == "lora" and env["WARM_UP"] == "true" and env["LOG_FORMAT"] == "text"
    assert env["BASE_MODEL"] == str(tmp_path / "models" / "tiny") and env["HF_HUB_OFFLINE"] == "1"
    # What the caller sets wins: a configured sealer, a real base model (which may need the hub).
    env = {
        "CALLBACK_KMS_KEY_ID": "alias/x",
        "BASE_MODEL": "meta-llama/Llama-3.2-1B-Instruct",
        "DEFAULT_METHOD": "qlora",
    }
    local_defaults(env, tmp_path)
    assert "CALLBACK_SEAL_KEY" not in env and "HF_HUB_OFFLINE" not in env and env["DEFAULT_METHOD"] == "qlora"
    assert env["DEV_MODE"] == "true"
