"""`make dev`: the whole local stack without Docker, ready in seconds, quiet when stopped.

It starts, in this order:

- the embedded S3+SQS endpoint (moto in server mode) on 127.0.0.1:$MOTO_PORT (default 4566),
  unless AWS_ENDPOINT_URL already points elsewhere (LocalStack, AWS), and creates the bucket
  and queues (`infra.bootstrap`);
- one trainer worker (`python -m trainer`) on the tiny local model (`DEV_DIR/models/tiny`)
  unless BASE_MODEL names another, serving metrics on $METRICS_PORT (default 9100, 0: none);
- the events consumer (the events Lambda's stand-in, so webhooks are delivered;
  EVENTS_CONSUMER=false leaves the events queue to your own consumer);
- the API with hot reload on 127.0.0.1:$PORT (default 8000).

Every port is checked before anything starts: a port in use stops `make dev` with a line naming
the port and its variable (a second stack must not answer for this one). Once the API answers
and the worker and the events consumer say they poll (their READY_FILE, `contracts.readiness`)
it prints one line starting `avatune: ready`. Every process logs one readable line per event
(LOG_FORMAT=text; LOG_FORMAT=json gives production's JSON lines). Ctrl-C stops everything it
started, quietly: the children run in sessions of their own, so the terminal's SIGINT reaches
this process alone, which stops them in order.

Local defaults that make it behave like a client's setup and start fast (each unless set):
DEFAULT_METHOD=lora (adapters train and generate on the full-precision base, as a client runs
them with PEFT), WARM_UP=true (the worker imports the training stack and loads its base before
it says it is ready), HF_HUB_OFFLINE=1 with the local tiny model (no library calls the model
hub), DEV_MODE=true when no AUTH_JWT_SECRET is set, and a local CALLBACK_SEAL_KEY when no
sealer is configured (so a job's webhook `auth_header` is accepted either way).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from contracts.readiness import READY_FILE_VARIABLE
from contracts.webhooks import DEV_SIGNING_SECRET

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_SECONDS = 600  # a real BASE_MODEL may download for minutes before the worker is ready


class DevStackError(Exception):
    """A reason not to start (or to stop): printed as one line, exit code 1."""


@dataclass(frozen=True)
class Port:
    variable: str
    default: int
    what: str
    host: str = "127.0.0.1"

    def value(self, env: dict[str, str]) -> int:
        raw = env.get(self.variable, "").strip() or str(self.default)
        try:
            port = int(raw)
        except ValueError:
            raise DevStackError(f"{self.variable}={raw!r} is not a port number") from None
        if not 0 <= port <= 65535:
            raise DevStackError(f"{self.variable}={port} is not a port number (0-65535)")
        return port


API_PORT = Port("PORT", 8000, "the API")
MOTO_PORT = Port("MOTO_PORT", 4566, "the embedded S3+SQS (moto)")
METRICS_PORT = Port("METRICS_PORT", 9100, "the trainer's Prometheus metrics", host="0.0.0.0")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether binding `host:port` fails now (something listens there)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(ports: list[tuple[Port, int]]) -> None:
    """Refuse to start when a port is taken or two are the same, naming the port and its variable."""
    seen: dict[int, Port] = {}
    for spec, port in ports:
        if port == 0:
            continue
        if port in seen:
            raise DevStackError(
                f"{spec.variable} and {seen[port].variable} are both {port}: give {spec.what} another port"
            )
        seen[port] = spec
        if port_in_use(port, spec.host):
            raise DevStackError(
                f"port {port} ({spec.variable}, {spec.what}) is already in use (another `make dev`?): "
                f"stop what listens there, or pick a free one, e.g. `make dev {spec.variable}={port + 1}`"
            )


def local_defaults(env: dict[str, str], dev_dir: Path) -> None:
    """The defaults of a local stack (module doc); what the caller set wins."""
    env.setdefault("AWS_ACCESS_KEY_ID", "test")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env.setdefault("S3_BUCKET", "avatune-dev")
    env.setdefault("LOG_FORMAT", "text")
    env.setdefault("DEFAULT_METHOD", "lora")
    env.setdefault("WARM_UP", "true")
    env.setdefault("MODEL_CACHE_DIR", str(dev_dir / "model-cache"))
    if not env.get("AUTH_JWT_SECRET"):
        env.setdefault("DEV_MODE", "true")
    if not any(env.get(v) for v in ("CALLBACK_SEALER", "CALLBACK_SEAL_KEY", "CALLBACK_KMS_KEY_ID")):
        # A fresh Fernet key per start: sealed headers live in the in-memory moto, gone at stop too.
        env["CALLBACK_SEALER"] = "local"
        env["CALLBACK_SEAL_KEY"] = base64.urlsafe_b64encode(os.urandom(32)).decode()
    if not env.get("BASE_MODEL"):
        env["BASE_MODEL"] = str(dev_dir / "models" / "tiny")
        # Nothing to fetch: keeps libraries (bitsandbytes' kernel lookup, ...) off the network.
        env.setdefault("HF_HUB_OFFLINE", "1")


def _is_off(value: str | None) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no", "off")


class DevStack:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.dev_dir = Path(env.get("DEV_DIR") or ROOT / ".dev").resolve()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.ready_files: dict[str, Path] = {}

    # -- starting ------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str], **kwargs: object) -> subprocess.Popen:
        # A session of its own: the terminal's Ctrl-C reaches `make dev` alone, which stops each
        # child in order (no child prints a KeyboardInterrupt traceback).
        proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append((name, proc))
        return proc

    def _ready_file(self, name: str, env: dict[str, str]) -> dict[str, str]:
        path = self.dev_dir / "run" / f"{name}-{os.getpid()}.ready"
        path.unlink(missing_ok=True)
        self.ready_files[name] = path
        return {**env, READY_FILE_VARIABLE: str(path)}

    def start_moto(self, port: int) -> None:
        endpoint = f"http://127.0.0.1:{port}"
        log_path = self.dev_dir / "logs" / "moto.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            proc = self._spawn(
                "moto",
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise DevStackError(f"moto exited with {proc.returncode} on port {port}: " + " | ".join(tail))
            if _answers(endpoint + "/moto-api/"):
                break
            if time.monotonic() > deadline:
                raise DevStackError(f"moto did not answer on {endpoint} within 60 s (log: {log_path})")
            time.sleep(0.1)
        self.env["AWS_ENDPOINT_URL"] = endpoint

    def bootstrap(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "infra.bootstrap"], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        if done.returncode:
            raise DevStackError(
                f"could not create the bucket and queues at {self.env['AWS_ENDPOINT_URL']}: "
                + (done.stderr.strip().splitlines() or ["no output"])[-1]
            )

    def start_trainer(self) -> None:
        """One worker on BASE_MODEL: the tiny local model unless set (written once, in well under
        a second, into DEV_DIR/models/tiny)."""
        tiny = self.dev_dir / "models" / "tiny"
        if self.env["BASE_MODEL"] == str(tiny) and not (tiny / "config.json").exists():
            done = subprocess.run(
                [sys.executable, "-m", "trainer.tiny_model", str(tiny)],
                cwd=ROOT,
                env=self.env,
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise DevStackError("could not write the tiny model: " + done.stderr.strip()[-500:])
        self._spawn("trainer", [sys.executable, "-m", "trainer"], self._ready_file("trainer", self.env))

    def start_events_consumer(self) -> None:
        """The events queue's consumer, as the events Lambda is configured in AWS, except that a
        job with `callbacks.allow_private` may call back to this machine (a local receiver)."""
        env = dict(self.env)
        env.setdefault("WEBHOOK_SIGNING_SECRET", DEV_SIGNING_SECRET)
        env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")
        self._spawn("events", [sys.executable, "-m", "infra.events_consumer"], self._ready_file("events", env))

    def start_api(self, port: int) -> None:
        self._spawn("api", [sys.executable, "-m", "infra.dev_api", str(port)], self.env)

    # -- waiting -------------------------------------------------------------------------------

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise DevStackError(f"the {name} process exited with {proc.returncode} (its lines above say why)")

    def wait_ready(self, api_url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        api_up = False
        while True:
            self.check_alive()
            api_up = api_up or _answers(api_url + "/healthz")  # asked until it answers once
            waiting = [name for name, path in self.ready_files.items() if not path.exists()]
            waiting += [] if api_up else ["api"]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"not ready after {READY_TIMEOUT_SECONDS} s: still waiting for {', '.join(waiting)}"
                )
            time.sleep(0.2)

    def serve_until_stopped(self) -> None:
        while True:
            self.check_alive()
            time.sleep(0.5)

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the services together, the API with SIGINT (as uvicorn expects), the worker and
        the events consumer with SIGTERM (the worker hands a running job back to the queue),
        then moto, which they need until they are gone; kill what is left after 30 s."""
        services = [proc for name, proc in self.procs if name != "moto"]
        for name, proc in self.procs:
            if name != "moto" and proc.poll() is None:
                proc.send_signal(signal.SIGINT if name == "api" else signal.SIGTERM)
        _wait_or_kill(services)
        for name, proc in self.procs:
            if name == "moto" and proc.poll() is None:
                proc.terminate()
        _wait_or_kill([proc for _, proc in self.procs])
        for path in self.ready_files.values():
            path.unlink(missing_ok=True)


def _wait_or_kill(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except OSError:
        return False


def _say(line: str) -> None:
    print(f"avatune: {line}", flush=True)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(env: dict[str, str]) -> None:
    started = time.monotonic()
    stack = DevStack(env)
    local_defaults(env, stack.dev_dir)
    embedded = not env.get("AWS_ENDPOINT_URL")
    api_port = API_PORT.value(env)
    ports = [(API_PORT, api_port), (METRICS_PORT, METRICS_PORT.value(env))]
    if embedded:
        ports.append((MOTO_PORT, MOTO_PORT.value(env)))
    check_ports(ports)
    try:
        if embedded:
            stack.start_moto(MOTO_PORT.value(env))
        stack.bootstrap()
        stack.start_trainer()
        if _is_off(env.get("EVENTS_CONSUMER")):
            _say("EVENTS_CONSUMER is off: job events stay on the events queue, no webhooks are sent")
        else:
            stack.start_events_consumer()
        stack.start_api(api_port)
        api_url = f"http://127.0.0.1:{api_port}"
        stack.wait_ready(api_url)
        consumer = "" if _is_off(env.get("EVENTS_CONSUMER")) else ", events consumer"
        _say(
            f"ready in {time.monotonic() - started:.1f} s: API {api_url} (try it: {api_url}/docs), "
            f"S3+SQS {env['AWS_ENDPOINT_URL']}, trainer on {env['BASE_MODEL']} ({env['DEFAULT_METHOD']}){consumer}. "
            'In another shell: export PATH="$PWD/.venv/bin:$PATH" AVATUNE_TOKEN=$(avatune token alice) '
            "(README, Quickstart). Ctrl-C stops it."
        )
        stack.serve_until_stopped()
    except KeyboardInterrupt:
        print(flush=True)
        _say("stopping")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        stack.stop()
    _say("stopped")


def main() -> None:
    # Ctrl-C, `kill`, a closed terminal: the same orderly stop (also when started in the
    # background, where SIGINT arrives ignored).
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGHUP, _raise_keyboard_interrupt)
    try:
        run(dict(os.environ))
    except DevStackError as exc:
        _say(f"error: {exc}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
