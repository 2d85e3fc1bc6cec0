"""`make dev`: the whole local stack without Docker.

Starts moto in server mode as the S3+SQS endpoint on 127.0.0.1:4566 (unless
AWS_ENDPOINT_URL already points elsewhere), creates the bucket and queues, starts one
trainer worker and the events consumer (the events Lambda's stand-in, so webhooks are
delivered; EVENTS_CONSUMER=false leaves the events queue to your own consumer), and serves
the API with hot reload on 127.0.0.1:$PORT (default 8000). Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from contracts.webhooks import DEV_SIGNING_SECRET

ROOT = Path(__file__).resolve().parent.parent
MOTO_PORT = 4566


def _wait_for(url: str, proc: subprocess.Popen | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {url}")


def _set_defaults(env: dict[str, str]) -> None:
    env.setdefault("AWS_ACCESS_KEY_ID", "test")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env.setdefault("S3_BUCKET", "avatune-dev")
    if not env.get("AUTH_JWT_SECRET"):
        env.setdefault("DEV_MODE", "true")


def _start_trainer(env: dict[str, str], procs: list[subprocess.Popen]) -> None:
    """One trainer worker on the tiny local model unless BASE_MODEL says otherwise."""
    if not (ROOT / "trainer" / "__main__.py").exists():
        return
    if not env.get("BASE_MODEL"):
        tiny = ROOT / ".dev" / "models" / "tiny"
        if not (tiny / "config.json").exists():
            subprocess.run([sys.executable, "-m", "trainer.tiny_model", str(tiny)], check=True, cwd=ROOT, env=env)
        env["BASE_MODEL"] = str(tiny)
    env.setdefault("MODEL_CACHE_DIR", str(ROOT / ".dev" / "model-cache"))
    procs.append(subprocess.Popen([sys.executable, "-m", "trainer"], cwd=ROOT, env=env))


def _start_events_consumer(env: dict[str, str], procs: list[subprocess.Popen]) -> None:
    """The events queue's consumer, as the events Lambda is configured in AWS, except that a
    job with `callbacks.allow_private` may call back to this machine (a local receiver)."""
    if env.get("EVENTS_CONSUMER", "true").strip().lower() in ("0", "false", "no", "off"):
        print("avatune: EVENTS_CONSUMER is off: job events stay on the events queue, no webhooks are sent")
        return
    consumer_env = dict(env)
    consumer_env.setdefault("WEBHOOK_SIGNING_SECRET", DEV_SIGNING_SECRET)
    consumer_env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")
    procs.append(subprocess.Popen([sys.executable, "-m", "infra.events_consumer"], cwd=ROOT, env=consumer_env))


def main() -> None:
    env = dict(os.environ)
    _set_defaults(env)
    procs: list[subprocess.Popen] = []

    def stop_all(*_: object) -> None:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_all)
    try:
        if not env.get("AWS_ENDPOINT_URL"):
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{MOTO_PORT}"
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait_for(env["AWS_ENDPOINT_URL"] + "/moto-api/", procs[-1])
            print(f"avatune: embedded S3+SQS (moto) on {env['AWS_ENDPOINT_URL']}")
        else:
            print(f"avatune: using the S3/SQS endpoint at {env['AWS_ENDPOINT_URL']}")
        subprocess.run(
            [sys.executable, "-m", "infra.bootstrap"], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL
        )
        _start_trainer(env, procs)
        _start_events_consumer(env, procs)
        port = env.get("PORT", "8000")
        print(
            f"\navatune: API on http://127.0.0.1:{port}  (docs: /docs)\n"
            "  get a dev token:  export TOKEN=$(.venv/bin/python -m handlers.devtoken alice)\n"
            '  then:             curl -H "Authorization: Bearer $TOKEN" '
            f"http://127.0.0.1:{port}/v1/users/alice/avatars/my-avatar/training-data\n",
            flush=True,
        )
        api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "handlers.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--reload",
                "--reload-dir",
                "handlers",
                "--reload-dir",
                "contracts",
            ],
            cwd=ROOT,
            env=env,
        )
        procs.append(api)
        api.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc is procs[-1] else signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
