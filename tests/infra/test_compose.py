"""Static checks of the local Docker stack (docker-compose.yml, Dockerfiles, LocalStack hook).

Docker is not needed: the compose file is parsed with PyYAML and the Dockerfiles as text. The
LocalStack init hook is also run for real against a moto server, through both of its paths
(infra.bootstrap, and the awslocal fallback via a fake `awslocal` backed by boto3).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from tests.conftest import ROOT  # noqa: E402

COMPOSE_FILE = ROOT / "docker-compose.yml"
READY_D_TARGET = "/etc/localstack/init/ready.d"
LOCALSTACK_IMAGE = "localstack/localstack:4.14.0"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE_FILE.is_file(), "docker-compose.yml is missing"
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str | None]:
    """`environment` as a dict, whether written as a mapping or a list of KEY=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): (None if v is None else str(v)) for k, v in env.items()}
    out: dict[str, str | None] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def volumes_of(service: dict) -> list[dict]:
    """Volumes as dicts {type, source, target, read_only}, from short or long syntax."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            source = str(vol.get("source", ""))
            out.append(
                {
                    "type": vol.get("type", "volume"),
                    "source": source,
                    "target": vol["target"],
                    "read_only": bool(vol.get("read_only", False)),
                }
            )
            continue
        parts = str(vol).split(":")
        if len(parts) == 1:  # anonymous volume
            out.append({"type": "volume", "source": "", "target": parts[0], "read_only": False})
            continue
        source, target = parts[0], parts[1]
        mode = parts[2] if len(parts) > 2 else ""
        kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(",")})
    return out


def binds_of(service: dict) -> list[dict]:
    return [v for v in volumes_of(service) if v["type"] == "bind"]


def bind_with_target(service: dict, target: str) -> dict:
    matches = [v for v in binds_of(service) if v["target"].rstrip("/") == target.rstrip("/")]
    assert matches, f"no bind mount with target {target}: {volumes_of(service)}"
    return matches[0]


def repo_path(source: str) -> Path:
    assert not source.startswith(("/", "~", "$")), f"bind source {source!r} should be repo-relative"
    return (ROOT / source).resolve()


def published_ports(service: dict) -> list[tuple[str, int]]:
    """(host port as written, container port) pairs, from short or long syntax."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((str(port.get("published", "")), int(port["target"])))
            continue
        spec = str(port).split("/")[0]
        # "${PORT:-8000}:8000" contains a colon inside the interpolation: split from the right.
        host, _, container = spec.rpartition(":")
        host = host.rpartition(":")[2] if host.count(":") and "${" not in host else host
        out.append((host, int(container)))
    return out


def host_port_default(host: str) -> str:
    """'${PORT:-8000}' -> '8000', '8000' -> '8000'."""
    m = re.fullmatch(r"\$\{\w+:?-([^}]*)\}", host)
    return m.group(1) if m else host


def command_argv(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else shlex.split(str(value))


def healthcheck_argv(service: dict) -> list[str]:
    hc = service.get("healthcheck")
    assert hc, "no healthcheck"
    assert not hc.get("disable"), "healthcheck disabled"
    test = hc["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return [str(t) for t in test]


def python_snippets(argv: list[str]) -> list[str]:
    """Code passed to `python -c` in an argv, also inside a CMD-SHELL string."""
    if argv[0] == "CMD-SHELL":
        argv = ["CMD", *shlex.split(argv[1])]
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-c"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    if pending:
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def exec_form(args: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return shlex.split(args)
    assert isinstance(value, list)
    return value


def dockerfile_of(service: dict) -> Path:
    build = service.get("build")
    assert build, "service is not built"
    if isinstance(build, str):
        return (ROOT / build / "Dockerfile").resolve()
    context = ROOT / build.get("context", ".")
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


def duration_seconds(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"bad duration {value!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def bootstrap_env_defaults() -> dict[str, str]:
    """{ENV: default} of the os.environ.get(ENV, default) calls in infra/bootstrap.py."""
    tree = ast.parse((ROOT / "infra" / "bootstrap.py").read_text())
    defaults = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and ast.unparse(node.func.value) == "os.environ"
            and len(node.args) == 2
            and all(isinstance(a, ast.Constant) for a in node.args)
        ):
            defaults[node.args[0].value] = node.args[1].value
    return defaults


def hook_scripts() -> list[Path]:
    ready_d = ROOT / "infra" / "localstack" / "ready.d"
    return sorted(p for p in ready_d.rglob("*") if p.is_file() and p.suffix in (".sh", ".py"))


def bootstrap_hook() -> Path:
    hooks = [p for p in hook_scripts() if p.suffix == ".sh" and "infra.bootstrap" in p.read_text()]
    assert hooks, "no ready.d shell hook runs infra.bootstrap"
    return hooks[0]


# --------------------------------------------------------------------------------------------
# services and localstack
# --------------------------------------------------------------------------------------------


def test_services(services):
    assert {"localstack", "api", "trainer", "events"} <= set(services)


def test_localstack_image_is_pinned(services):
    assert services["localstack"].get("image") == LOCALSTACK_IMAGE


def test_localstack_runs_s3_and_sqs_and_passes_auth_token(services):
    env = env_of(services["localstack"])
    assert {"s3", "sqs"} <= {s.strip() for s in (env.get("SERVICES") or "").split(",")}
    assert "LOCALSTACK_AUTH_TOKEN" in env
    token = env["LOCALSTACK_AUTH_TOKEN"]
    # Either a bare pass-through (`- LOCALSTACK_AUTH_TOKEN`) or an interpolation of the host var.
    assert token is None or re.fullmatch(r"\$\{LOCALSTACK_AUTH_TOKEN(:?-[^}]*)?\}", token), token


def test_localstack_publishes_4566(services):
    ports = published_ports(services["localstack"])
    assert ("4566", 4566) in [(host_port_default(h), c) for h, c in ports], ports


def test_localstack_ready_hook_is_mounted_and_executable(services):
    mount = bind_with_target(services["localstack"], READY_D_TARGET)
    source = repo_path(mount["source"])
    assert source.is_dir(), f"{mount['source']} must be a directory in the repo"
    assert source == (ROOT / "infra" / "localstack" / "ready.d").resolve()
    shell_hooks = [p for p in source.iterdir() if p.suffix == ".sh"]
    assert shell_hooks, "ready.d has no .sh hook"
    for hook in shell_hooks:
        # LocalStack only runs shell hooks that are executable and have a shebang.
        assert hook.stat().st_mode & stat.S_IXUSR, f"{hook.name} is not executable"
        assert hook.read_text().startswith("#!"), f"{hook.name} has no shebang"
    assert any("infra.bootstrap" in p.read_text() for p in shell_hooks)


def test_localstack_hook_can_import_the_mounted_bootstrap(services):
    """The hook cds into the parent of the ./infra mount and runs `-m infra.bootstrap` there."""
    infra_mounts = [v for v in binds_of(services["localstack"]) if repo_path(v["source"]) == ROOT / "infra"]
    assert infra_mounts, "./infra is not mounted into localstack"
    target = infra_mounts[0]["target"].rstrip("/")
    assert target.endswith("/infra"), target
    src_root = target[: -len("/infra")]
    text = bootstrap_hook().read_text()
    assert src_root in text, f"hook does not use {src_root}"
    assert re.search(r"-m\s+infra\.bootstrap", text)
    assert (ROOT / "infra" / "bootstrap.py").is_file()
    assert all(v["read_only"] for v in binds_of(services["localstack"])), "mounts should be read-only"


def test_hook_passes_bash_syntax_check():
    bash = shutil.which("bash")
    if not bash:
        pytest.skip("bash not available")
    for hook in hook_scripts():
        if hook.suffix == ".sh":
            proc = subprocess.run([bash, "-n", str(hook)], capture_output=True, text=True)
            assert proc.returncode == 0, f"{hook.name}: {proc.stderr}"


def test_localstack_healthcheck_waits_for_init_hooks(services):
    argv = healthcheck_argv(services["localstack"])
    joined = " ".join(argv)
    assert "/_localstack/init" in joined, "healthcheck must wait for the init hooks"
    assert ":4566" in joined
    for code in python_snippets(argv):
        compile(code, "<localstack healthcheck>", "exec")


# --------------------------------------------------------------------------------------------
# api
# --------------------------------------------------------------------------------------------


def test_api_builds_from_dockerfile_dev(services):
    path = dockerfile_of(services["api"])
    assert path == (ROOT / "Dockerfile.dev").resolve()
    assert path.is_file()


def test_api_runs_uvicorn_with_reload(services):
    api = services["api"]
    argv = command_argv(api.get("command"))
    if not argv:  # fall back to the image's CMD
        cmds = [exec_form(a) for i, a in dockerfile_instructions(dockerfile_of(api)) if i == "CMD"]
        argv = cmds[-1] if cmds else []
    assert "uvicorn" in argv[:3], argv
    assert "handlers.app:app" in argv
    assert "--reload" in argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8000"
    reload_dirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--reload-dir"]
    for d in reload_dirs:
        assert (ROOT / d).is_dir(), f"--reload-dir {d} does not exist in the repo"


def test_api_mounts_the_source(services):
    api = services["api"]
    workdirs = [a for i, a in dockerfile_instructions(dockerfile_of(api)) if i == "WORKDIR"]
    assert workdirs, "Dockerfile.dev has no WORKDIR"
    workdir = workdirs[-1].rstrip("/")
    for pkg in ("handlers", "contracts", "infra"):
        mount = bind_with_target(api, f"{workdir}/{pkg}")
        assert repo_path(mount["source"]) == ROOT / pkg
        assert not mount["read_only"] or pkg != "handlers"


def test_api_publishes_8000(services):
    ports = published_ports(services["api"])
    assert any(c == 8000 and host_port_default(h) == "8000" for h, c in ports), ports


def test_api_env_points_at_localstack(services):
    env = env_of(services["api"])
    endpoint = urlparse(env.get("AWS_ENDPOINT_URL") or "")
    assert endpoint.hostname == "localstack" and endpoint.hostname in services
    assert endpoint.port == 4566
    assert env.get("S3_BUCKET")
    assert (env.get("DEV_MODE") or "").lower() == "true"
    assert env.get("AWS_DEFAULT_REGION")
    assert env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")
    assert "AUTH_JWT_SECRET" in env


def test_api_healthcheck_hits_healthz(services):
    argv = healthcheck_argv(services["api"])
    joined = " ".join(argv)
    assert "/healthz" in joined and ":8000" in joined
    assert "curl" not in joined and "wget" not in joined, "python:slim has neither curl nor wget"
    snippets = python_snippets(argv)
    assert snippets, "expected a python -c healthcheck"
    for code in snippets:
        compile(code, "<api healthcheck>", "exec")


@pytest.mark.parametrize("name", ["api", "trainer", "events"])
def test_waits_for_healthy_localstack(services, name):
    depends = services[name].get("depends_on")
    assert isinstance(depends, dict), f"{name}: depends_on must use the long form with a condition"
    assert depends.get("localstack", {}).get("condition") == "service_healthy"
    assert services["localstack"].get("healthcheck"), "service_healthy needs a healthcheck"


def test_events_consumer_runs_from_the_api_image_with_the_source_mounted(services):
    events = services["events"]
    assert events["build"]["dockerfile"] == "Dockerfile.dev"
    assert events["command"] == ["python", "-m", "infra.events_consumer"]
    assert (ROOT / "infra" / "events_consumer.py").is_file()
    for pkg in ("handlers", "contracts", "infra"):
        assert bind_with_target(events, f"/app/{pkg}"), f"events: ./{pkg} is not mounted"
    env = env_of(events)
    assert env["AWS_ENDPOINT_URL"] == "http://localstack:4566" and env["WEBHOOK_ALLOW_PRIVATE"] == "true"


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------


def test_trainer_builds_from_dockerfile_trainer_and_runs_the_worker(services):
    trainer = services["trainer"]
    path = dockerfile_of(trainer)
    assert path == (ROOT / "Dockerfile.trainer").resolve() and path.is_file()
    instructions = dockerfile_instructions(path)
    entrypoints = [exec_form(a) for i, a in instructions if i == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == ["python", "-m", "trainer"], entrypoints
    # compose must not override the worker with something else
    assert trainer.get("entrypoint") is None
    assert not command_argv(trainer.get("command"))
    stopsignals = [a for i, a in instructions if i == "STOPSIGNAL"]
    assert stopsignals and stopsignals[-1] == "SIGTERM"


def test_trainer_env_and_model_cache(compose, services):
    trainer = services["trainer"]
    env = env_of(trainer)
    endpoint = urlparse(env.get("AWS_ENDPOINT_URL") or "")
    assert (endpoint.hostname, endpoint.port) == ("localstack", 4566)
    for key in ("S3_BUCKET", "TRAIN_QUEUE_NAME", "EVENTS_QUEUE_NAME", "BASE_MODEL", "AWS_DEFAULT_REGION"):
        assert env.get(key), key
    assert "HF_TOKEN" in env
    cache_dir = env.get("MODEL_CACHE_DIR")
    assert cache_dir
    named = [v for v in volumes_of(trainer) if v["type"] == "volume" and v["source"]]
    holding = [v for v in named if cache_dir == v["target"] or cache_dir.startswith(v["target"].rstrip("/") + "/")]
    assert holding, f"MODEL_CACHE_DIR {cache_dir} is not on a named volume"
    assert holding[0]["source"] in (compose.get("volumes") or {}), "named volume not declared"


def test_trainer_gets_time_to_checkpoint(services):
    trainer = services["trainer"]
    assert duration_seconds(trainer.get("stop_grace_period", "10s")) >= 30
    assert trainer.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_trainer_mounts_the_source(services):
    for pkg in ("trainer", "contracts"):
        mount = bind_with_target(services["trainer"], f"/app/{pkg}")
        assert repo_path(mount["source"]) == ROOT / pkg


# --------------------------------------------------------------------------------------------
# every path the stack refers to exists; images stay lean
# --------------------------------------------------------------------------------------------


def test_build_dockerfiles_and_bind_sources_exist(services):
    for name, service in services.items():
        if service.get("build"):
            assert dockerfile_of(service).is_file(), f"{name}: Dockerfile missing"
        for vol in binds_of(service):
            assert repo_path(vol["source"]).exists(), f"{name}: bind source {vol['source']} missing"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.dev", "Dockerfile.trainer"])
def test_dockerfile_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    ignore_patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for instr, args in dockerfile_instructions(ROOT / dockerfile):
        if instr not in ("COPY", "ADD"):
            continue
        argv = [a for a in (exec_form(args) if args.startswith("[") else shlex.split(args)) if not a.startswith("--")]
        for source in argv[:-1]:
            if any(ch in source for ch in "*?["):
                continue  # optional glob, e.g. README.m[d]
            assert (ROOT / source).exists(), f"{dockerfile}: COPY source {source} missing"
            for pattern in ignore_patterns:
                assert not pattern.startswith("!")
                assert not fnmatch.fnmatch(source.rstrip("/"), pattern.lstrip("/")), (
                    f"{dockerfile}: {source} is excluded by .dockerignore pattern {pattern}"
                )


def test_dockerignore_excludes_local_state():
    patterns = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for required in (".venv", ".git", ".dev", ".pytest_cache"):
        assert required in patterns or f"**/{required}" in patterns, required


def test_api_image_does_not_install_trainer_extra():
    instructions = dockerfile_instructions(ROOT / "Dockerfile.dev")
    base = [a for i, a in instructions if i == "FROM"]
    assert base and not re.search(r"pytorch|cuda", base[0], re.I), base
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "pip install" in runs
    assert not re.search(r"\btorch\b", runs, re.I), "the API image must not install torch"
    assert not re.search(r"""\[[^\]]*\btrainer\b[^\]]*\]|['"]trainer['"]""", runs), "trainer extra installed"
    assert re.search(r"""\[[^\]]*\bapi\b[^\]]*\]|['"]api['"]""", runs), "api extra not installed"


def test_images_run_as_non_root():
    for dockerfile in ("Dockerfile.dev", "Dockerfile.trainer"):
        users = [a for i, a in dockerfile_instructions(ROOT / dockerfile) if i == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), dockerfile


def test_stack_names_match_infra_bootstrap(services):
    """Compose defaults and the hook use the same bucket/queue names as infra/bootstrap.py."""
    defaults = bootstrap_env_defaults()
    assert {"S3_BUCKET", "TRAIN_QUEUE_NAME", "EVENTS_QUEUE_NAME"} <= set(defaults), defaults
    hook_text = bootstrap_hook().read_text()
    for key, default in defaults.items():
        expected = f"${{{key}:-{default}}}"
        for name in ("localstack", "api", "trainer", "events"):
            assert env_of(services[name]).get(key) == expected, f"{name}: {key} should be {expected}"
        assert expected in hook_text, f"hook: {key} should default to {default}"


def test_docker_compose_config_is_valid():
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose CLI not available")
    proc = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# the hook, run for real against moto
# --------------------------------------------------------------------------------------------

FAKE_AWSLOCAL = textwrap.dedent(
    '''
    """Minimal `awslocal` stand-in: the subcommands the hook uses, executed with boto3."""
    import json, os, sys
    import boto3
    from botocore.exceptions import ClientError

    with open(os.environ["FAKE_AWS_LOG"], "a") as log:
        log.write(json.dumps(sys.argv[1:]) + "\\n")
    service, op, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    opts, i = {}, 0
    while i < len(rest):
        key = rest[i][2:]
        values = []
        i += 1
        while i < len(rest) and not rest[i].startswith("--"):
            values.append(rest[i])
            i += 1
        opts[key] = values if len(values) != 1 else values[0]
    query, output = opts.pop("query", None), opts.pop("output", "json")

    def attrs(value):
        if value.lstrip().startswith("{"):
            return json.loads(value)
        return dict(pair.split("=", 1) for pair in value.split(","))

    client = boto3.client("s3" if service == "s3api" else service, endpoint_url=os.environ["FAKE_ENDPOINT"])
    try:
        if op == "head-bucket":
            resp = client.head_bucket(Bucket=opts["bucket"])
        elif op == "create-bucket":
            kw = {"Bucket": opts["bucket"]}
            if "create-bucket-configuration" in opts:
                kw["CreateBucketConfiguration"] = attrs(opts["create-bucket-configuration"])
            resp = client.create_bucket(**kw)
        elif op == "get-queue-url":
            resp = client.get_queue_url(QueueName=opts["queue-name"])
        elif op == "create-queue":
            resp = client.create_queue(QueueName=opts["queue-name"], Attributes=attrs(opts.get("attributes", "{}")))
        elif op == "set-queue-attributes":
            resp = client.set_queue_attributes(QueueUrl=opts["queue-url"], Attributes=attrs(opts["attributes"]))
        elif op == "get-queue-attributes":
            names = opts["attribute-names"]
            resp = client.get_queue_attributes(
                QueueUrl=opts["queue-url"], AttributeNames=names if isinstance(names, list) else [names]
            )
        else:
            sys.exit(f"fake awslocal: unsupported {service} {op}")
    except ClientError as exc:
        print(exc, file=sys.stderr)
        sys.exit(254)
    resp.pop("ResponseMetadata", None)
    if query:
        for part in query.split("."):
            resp = resp[part]
    print(resp if output == "text" else json.dumps(resp))
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_endpoint():
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    if not shutil.which("bash"):
        pytest.skip("bash not available")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def fresh_moto(moto_endpoint):
    req = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10).close()
    return moto_endpoint


def _hook_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {
        "HOME": str(tmp_path),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BOOTSTRAP_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    env.update(extra)
    return env


def _run_hook(env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [shutil.which("bash"), str(bootstrap_hook())], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"hook failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _assert_stack(endpoint: str) -> None:
    import boto3

    defaults = bootstrap_env_defaults()
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    sqs = boto3.client(
        "sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    assert defaults["S3_BUCKET"] in {b["Name"] for b in s3.list_buckets()["Buckets"]}

    def attrs(name: str) -> dict:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]

    train = defaults["TRAIN_QUEUE_NAME"]
    events = defaults["EVENTS_QUEUE_NAME"]
    for name, dlq, fifo, visibility in (
        (train, train.removesuffix(".fifo") + "-dlq.fifo", True, "120"),
        (events, events + "-dlq", False, "30"),
    ):
        queue, dead = attrs(name), attrs(dlq)
        assert (queue.get("FifoQueue") == "true") is fifo, name
        assert (dead.get("FifoQueue") == "true") is fifo, dlq
        assert queue["VisibilityTimeout"] == visibility, name
        redrive = json.loads(queue["RedrivePolicy"])
        assert redrive["deadLetterTargetArn"] == dead["QueueArn"], name
        assert int(redrive["maxReceiveCount"]) == 5, name


def test_hook_runs_infra_bootstrap_idempotently(fresh_moto, tmp_path):
    env = _hook_env(tmp_path, fresh_moto, AVATUNE_SRC=str(ROOT), BOOTSTRAP_PYTHON=sys.executable)
    first = _run_hook(env)
    assert "infra.bootstrap" in first.stderr
    _run_hook(env)  # second start: nothing to create, must still succeed
    _assert_stack(fresh_moto)


def test_hook_awslocal_fallback_creates_the_same_stack(fresh_moto, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "awslocal"
    fake.write_text(f"#!{sys.executable}\n{FAKE_AWSLOCAL}")
    fake.chmod(0o755)
    log = tmp_path / "aws-calls.jsonl"
    # PATH holds only the fake: no python3 with boto3 is found, so the hook must fall back.
    env = _hook_env(
        tmp_path,
        fresh_moto,
        PATH=str(bin_dir),
        AVATUNE_SRC=str(tmp_path / "no-such-src"),
        FAKE_ENDPOINT=fresh_moto,
        FAKE_AWS_LOG=str(log),
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
    )
    _run_hook(env)
    _assert_stack(fresh_moto)

    log.write_text("")
    _run_hook(env)  # idempotent: the second run creates nothing and still succeeds
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls, "fallback did not call awslocal"
    assert not [c for c in calls if c[1] in ("create-bucket", "create-queue")], calls
    _assert_stack(fresh_moto)
