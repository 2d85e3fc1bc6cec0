"""Static checks of the trainer's Kubernetes manifests (infra/k8s, applied with `kubectl apply -k`).

The kustomization is rendered in Python (namespace + `replacements` from values.yaml, the
subset of kustomize it uses) and, where kubectl is installed, compared with
`kubectl kustomize`. Core resources are validated against the Kubernetes OpenAPI schemas that
`kubernetes-validate` ships (offline); KEDA's ScaledObject and TriggerAuthentication are
CRDs, so they are validated against a structural schema written here (and the HPA behavior
block against the core HorizontalPodAutoscaler schema).

Then what the deployment relies on: one GPU per pod, a grace period that covers the SIGTERM
checkpoint, configuration wired from the ConfigMap and the Secret, IRSA, the metrics port, and
the KEDA trigger (the train queue, queueLength 1, in-flight messages counted, scale to zero).
`test_checks_catch_*` prove each check fails when its subject is broken.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

from tests.conftest import ROOT  # noqa: E402
from tests.infra.test_infra_aws import load_template, render  # noqa: E402

K8S = ROOT / "infra" / "k8s"
PLACEHOLDER = "REPLACED-FROM-values.yaml"
CORE_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Deployment"}
CLUSTER_SCOPED = {"Namespace"}
LOCAL_CONFIG = "config.kubernetes.io/local-config"


# --------------------------------------------------------------------------------------------
# rendering (the kustomize subset infra/k8s uses)
# --------------------------------------------------------------------------------------------


def _split_path(path: str) -> list[str]:
    """`a.b.[k=v].c` / `metadata.annotations.[x.y/z]` -> segments (brackets keep their dots)."""
    return [m.group(1) or m.group(2) for m in re.finditer(r"\[([^\]]*)\]|([^.\[\]]+)", path)]


def _step(node: Any, segment: str, create: bool = False) -> Any:
    if isinstance(node, list):
        key, _, value = segment.partition("=")
        matches = [item for item in node if isinstance(item, dict) and str(item.get(key)) == value]
        assert len(matches) == 1, f"{segment}: {len(matches)} matches"
        return matches[0]
    if segment not in node and create:
        node[segment] = {}
    return node[segment]


def get_path(doc: dict, path: str) -> Any:
    node: Any = doc
    for segment in _split_path(path):
        node = _step(node, segment)
    return node


def set_path(doc: dict, path: str, value: Any) -> None:
    segments = _split_path(path)
    node: Any = doc
    for segment in segments[:-1]:
        node = _step(node, segment, create=True)
    node[segments[-1]] = value


def _select(docs: list[dict], selector: dict) -> list[dict]:
    return [
        d
        for d in docs
        if d["kind"] == selector.get("kind", d["kind"])
        and d["metadata"]["name"] == selector.get("name", d["metadata"]["name"])
    ]


def load_manifests(directory: Path = K8S) -> tuple[dict, list[dict]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((directory / resource).read_text()) if d)
    return kustomization, docs


def render_kustomization(kustomization: dict, docs: list[dict]) -> list[dict]:
    unsupported = set(kustomization) - {"apiVersion", "kind", "namespace", "resources", "replacements"}
    assert not unsupported, f"extend render_kustomization for {unsupported}"
    docs = copy.deepcopy(docs)
    for replacement in kustomization.get("replacements", []):
        source = _select(docs, replacement["source"])
        assert len(source) == 1, replacement["source"]
        value = get_path(source[0], replacement["source"]["fieldPath"])
        for target in replacement["targets"]:
            selected = _select(docs, target["select"])
            assert selected, f"replacement target {target['select']} matches nothing"
            for doc in selected:
                for path in target["fieldPaths"]:
                    get_path(doc, path)  # must exist: kustomize does not create fields here
                    set_path(doc, path, value)
    namespace = kustomization.get("namespace")
    out = []
    for doc in docs:
        if str(doc["metadata"].get("annotations", {}).get(LOCAL_CONFIG, "")).lower() == "true":
            continue
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
        out.append(doc)
    return out


@pytest.fixture(scope="module")
def manifests() -> tuple[dict, list[dict]]:
    assert (K8S / "kustomization.yaml").is_file(), "infra/k8s/kustomization.yaml is missing"
    return load_manifests()


@pytest.fixture(scope="module")
def docs(manifests) -> list[dict]:
    return render_kustomization(*manifests)


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template()


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def values(manifests) -> dict[str, str]:
    return one(manifests[1], "ConfigMap", "avatune-deploy-values")["data"]


def trainer_container(docs: list[dict]) -> dict:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one trainer container per pod (one GPU each)"
    return containers[0]


def config_data(docs: list[dict]) -> dict[str, str]:
    container = trainer_container(docs)
    refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    assert len(refs) == 1, f"the trainer takes its config from one ConfigMap, got {refs}"
    return one(docs, "ConfigMap", refs[0])["data"]


# --------------------------------------------------------------------------------------------
# schemas: core resources (kubernetes-validate, offline) and KEDA's CRDs (structural)
# --------------------------------------------------------------------------------------------


def _k8s_versions() -> list[str]:
    pytest.importorskip("kubernetes_validate")
    from kubernetes_validate import utils

    shipped = utils.all_versions()
    # EKS's long-supported 1.30 and the newest schema the installed package ships.
    return sorted({v for v in ("1.30.0", shipped[-1]) if v in shipped}) or [shipped[-1]]


def test_core_manifests_validate(docs):
    kv = pytest.importorskip("kubernetes_validate")
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} >= {"Namespace", "ServiceAccount", "ConfigMap", "Deployment"}
    assert not [d for d in docs if d["kind"] not in CORE_KINDS | {"ScaledObject", "TriggerAuthentication"}]
    for version in _k8s_versions():
        for doc in core:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc.message}")


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
}

SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": STRING_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": False,
            "properties": {
                "podIdentity": {
                    "type": "object",
                    "required": ["provider"],
                    "additionalProperties": False,
                    "properties": {
                        "provider": {"enum": ["none", "aws", "aws-eks", "azure-workload", "gcp"]},
                        "roleArn": {"type": "string"},
                        "identityOwner": {"enum": ["keda", "workload"]},
                        "identityId": {"type": "string"},
                    },
                    "not": {"required": ["roleArn", "identityOwner"]},
                },
                "secretTargetRef": {"type": "array"},
                "env": {"type": "array"},
            },
        },
    },
}


def test_keda_resources_are_structurally_valid(docs):
    for kind, schema in (
        ("ScaledObject", SCALED_OBJECT_SCHEMA),
        ("TriggerAuthentication", TRIGGER_AUTHENTICATION_SCHEMA),
    ):
        found = [d for d in docs if d["kind"] == kind]
        assert found, f"no {kind}"
        for doc in found:
            jsonschema.Draft202012Validator(schema).validate(doc)


def test_scaling_behavior_is_a_valid_hpa_behavior(docs):
    """KEDA hands `advanced.horizontalPodAutoscalerConfig.behavior` to the HPA it creates."""
    kv = pytest.importorskip("kubernetes_validate")
    scaled = one(docs, "ScaledObject")
    behavior = scaled["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is None:
        pytest.skip("no HPA behavior configured")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-avatune-trainer"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "avatune-trainer"},
            "minReplicas": 1,
            "maxReplicas": scaled["spec"]["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    for version in _k8s_versions():
        kv.validate(hpa, version, strict=True)


# --------------------------------------------------------------------------------------------
# the checks (each raises AssertionError); they take the rendered documents
# --------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    return float(value)


def check_keda_trigger(docs: list[dict]) -> None:
    deployment = one(docs, "Deployment")
    scaled = one(docs, "ScaledObject")
    spec = scaled["spec"]
    ref = spec["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] == deployment["metadata"]["name"]
    assert ref.get("apiVersion", "apps/v1") == "apps/v1"
    assert spec.get("minReplicaCount", 0) == 0 and "minReplicaCount" in spec, "minReplicaCount: 0 (scale to zero)"
    assert "idleReplicaCount" not in spec
    assert int(spec.get("maxReplicaCount", 100)) >= 1 and "maxReplicaCount" in spec, "cap the GPU fleet"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count: no spec.replicas"

    triggers = spec["triggers"]
    assert [t["type"] for t in triggers] == ["aws-sqs-queue"], "scale on the train queue only"
    meta = triggers[0]["metadata"]
    assert meta.get("queueLength") == "1", "one pod per message"
    assert meta.get("scaleOnInFlight") == "true", "in-flight (busy) messages must count"
    assert meta.get("activationQueueLength", "0") == "0"
    assert meta.get("scaleOnDelayed", "false") == "false"
    assert "identityOwner" not in meta and "awsAccessKeyID" not in meta, "auth goes through the TriggerAuthentication"

    config = config_data(docs)
    url = urlparse(meta["queueURL"])
    assert url.scheme == "https" and url.hostname == f"sqs.{meta['awsRegion']}.amazonaws.com", meta["queueURL"]
    assert url.path.rsplit("/", 1)[-1] == config["TRAIN_QUEUE_NAME"], "KEDA must watch the queue the trainer consumes"
    assert config["TRAIN_QUEUE_NAME"].endswith(".fifo")
    assert meta["awsRegion"] == config["AWS_REGION"] == config["AWS_DEFAULT_REGION"]

    auth = one(docs, "TriggerAuthentication", triggers[0]["authenticationRef"]["name"])
    assert triggers[0]["authenticationRef"].get("kind", "TriggerAuthentication") == "TriggerAuthentication"
    assert auth["spec"] == {"podIdentity": {"provider": "aws"}}, "pod identity (the KEDA operator's IRSA role)"


def check_gpu(docs: list[dict]) -> None:
    resources = trainer_container(docs)["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1, "one GPU per trainer"
    if "nvidia.com/gpu" in resources.get("requests", {}):
        assert int(resources["requests"]["nvidia.com/gpu"]) == 1
    assert "memory" in resources["limits"], "bound the pod's memory"


def check_grace_period(docs: list[dict]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    grace = int(pod["terminationGracePeriodSeconds"])
    config = config_data(docs)
    heartbeat = _number(config["HEARTBEAT_SECONDS"])
    assert grace >= 60, "the SIGTERM checkpoint needs at least a minute"
    assert grace > heartbeat, "grace period must outlast a heartbeat"
    assert _number(config["VISIBILITY_TIMEOUT_SECONDS"]) > heartbeat, "heartbeat must renew before visibility lapses"
    assert _number(config["LEASE_SECONDS"]) > heartbeat, "heartbeat must renew the lease before it lapses"
    assert "preStop" not in trainer_container(docs).get("lifecycle", {}), "SIGTERM goes straight to the worker"


def check_env_wiring(docs: list[dict]) -> None:
    from trainer.settings import TrainerSettings

    container = trainer_container(docs)
    config = config_data(docs)
    required = {
        "S3_BUCKET",
        "TRAIN_QUEUE_NAME",
        "EVENTS_QUEUE_NAME",
        "BASE_MODEL",
        "MODEL_CACHE_DIR",
        "HEARTBEAT_SECONDS",
        "VISIBILITY_TIMEOUT_SECONDS",
        "LEASE_SECONDS",
        "CHECKPOINT_INTERVAL_SECONDS",
        "METRICS_PORT",
        "AWS_REGION",
    }
    assert required <= set(config), f"ConfigMap misses {sorted(required - set(config))}"
    assert PLACEHOLDER not in str(docs), "a placeholder was not replaced from values.yaml"

    known: set[str] = set()
    for field in TrainerSettings.model_fields.values():
        alias = field.validation_alias
        known.update(getattr(alias, "choices", [alias]) if alias else [])
        if field.alias:
            known.add(field.alias)
    assert set(config) <= known, f"ConfigMap keys the trainer does not read: {sorted(set(config) - known)}"
    settings = TrainerSettings(**config)
    assert settings.train_queue_name == config["TRAIN_QUEUE_NAME"]
    for secret_key in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        assert secret_key not in config, f"{secret_key} does not belong in a ConfigMap"
    assert "AWS_ENDPOINT_URL" not in config, "on AWS the SDK's endpoints are used"

    env = {e["name"]: e for e in container.get("env", [])}
    hf = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert hf["key"] == "HF_TOKEN" and hf["name"] == "avatune-trainer-secrets"
    assert not hf.get("optional"), "a missing HF token must stop the pod, not fail every job"
    for name, entry in env.items():
        assert "value" not in entry or name in ("HOME", "XDG_CACHE_HOME"), f"{name}: config belongs in the ConfigMap"
    assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def _mounts(docs: list[dict]) -> dict[str, dict]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in trainer_container(docs)["volumeMounts"]}


def check_model_cache(docs: list[dict]) -> None:
    cache_dir = config_data(docs)["MODEL_CACHE_DIR"]
    holding = [
        (path, v)
        for path, v in _mounts(docs).items()
        if cache_dir == path or cache_dir.startswith(path.rstrip("/") + "/")
    ]
    assert holding, f"MODEL_CACHE_DIR {cache_dir} is on no volume"
    volume = holding[0][1]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume or "ephemeral" in volume, volume
    if "emptyDir" in volume:
        assert volume["emptyDir"].get("sizeLimit"), "bound the cache's disk use"
    container = trainer_container(docs)
    if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        assert "/tmp" in _mounts(docs), "a read-only root needs a writable /tmp"


def check_metrics_port(docs: list[dict]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]
    ports = {p["name"]: p for p in trainer_container(docs).get("ports", [])}
    port = int(config_data(docs)["METRICS_PORT"])
    assert ports["metrics"]["containerPort"] == port == 9100
    annotations = pod["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(port)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def check_identity(docs: list[dict]) -> None:
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    account = one(docs, "ServiceAccount", pod["serviceAccountName"])
    arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/.+", arn), arn
    security = pod.get("securityContext", {})
    assert security.get("runAsNonRoot") is True and int(security.get("runAsUser", 0)) != 0
    container_security = trainer_container(docs).get("securityContext", {})
    assert container_security.get("allowPrivilegeEscalation") is False
    assert "ALL" in container_security.get("capabilities", {}).get("drop", [])
    assert not container_security.get("privileged")


ALL_CHECKS: list[Callable[[list[dict]], None]] = [
    check_keda_trigger,
    check_gpu,
    check_grace_period,
    check_env_wiring,
    check_model_cache,
    check_metrics_port,
    check_identity,
]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_manifests(docs, check):
    check(docs)


def test_raw_files_parse_and_are_all_in_the_kustomization(manifests):
    kustomization, docs = manifests
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed, f"not in kustomization.yaml: {sorted(on_disk - listed)}"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
        assert "namespace" not in doc["metadata"], "the kustomization sets the namespace"


def test_values_file_is_the_only_thing_to_fill(manifests):
    """Every placeholder in the manifests is overwritten from values.yaml, values.yaml is never
    applied, and its example values hang together (a stack named `avatune`)."""
    kustomization, raw = manifests
    vals = one(raw, "ConfigMap", "avatune-deploy-values")
    assert vals["metadata"]["annotations"][LOCAL_CONFIG] == "true"
    replaced = {
        (r["source"]["fieldPath"], t["select"]["kind"], p)
        for r in kustomization["replacements"]
        for t in r["targets"]
        for p in t["fieldPaths"]
    }
    placeholders = []
    for doc in raw:

        def walk(node: Any, path: str, doc: dict[str, Any] = doc) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{path}[{i}]")
            elif node == PLACEHOLDER:
                placeholders.append((doc["kind"], path))

        walk(doc, "")
    assert placeholders, "placeholders mark what values.yaml fills in"
    assert len(placeholders) <= len(replaced)
    data = vals["data"]
    assert set(data) == {
        "trainerImage",
        "trainerRoleArn",
        "region",
        "bucket",
        "trainQueueName",
        "trainQueueUrl",
        "eventsQueueName",
        "callbackKeyArn",
    }
    assert data["callbackKeyArn"].startswith("arn:aws:kms:")
    assert data["trainQueueUrl"].endswith("/" + data["trainQueueName"])
    assert f"sqs.{data['region']}." in data["trainQueueUrl"]


def test_matches_the_sam_template(docs, template):
    """Names and timings shared with infra/aws/template.yaml."""
    params = template["Parameters"]
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["namespace"] == params["TrainerNamespace"]["Default"]
    assert account["metadata"]["name"] == params["TrainerServiceAccountName"]["Default"]
    assert one(docs, "Namespace")["metadata"]["name"] == params["TrainerNamespace"]["Default"]
    config = config_data(docs)
    train_queue = template["Resources"]["TrainQueue"]["Properties"]
    assert int(config["VISIBILITY_TIMEOUT_SECONDS"]) == int(train_queue["VisibilityTimeout"])
    stack_name = "avatune"  # the example values are those of a stack with this name
    expand = lambda s: render(s).replace("${AWS::StackName}", stack_name)  # noqa: E731
    assert config["TRAIN_QUEUE_NAME"] == expand(train_queue["QueueName"])
    assert config["EVENTS_QUEUE_NAME"] == expand(template["Resources"]["EventsQueue"]["Properties"]["QueueName"])
    assert "CallbackKeyArn" in template["Outputs"] and config["CALLBACK_SEALER"] == "kms"
    image = trainer_container(docs)["image"]
    assert image.endswith(f"/{stack_name}-trainer:" + params["TrainerImageTag"]["Default"]), image
    assert (
        render(template["Resources"]["TrainerRepository"]["Properties"]["RepositoryName"])
        == "${AWS::StackName}-trainer"
    )


def test_matches_the_trainer_image():
    """The pod's uid and the cache paths agree with Dockerfile.trainer."""
    dockerfile = (ROOT / "Dockerfile.trainer").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    docs = render_kustomization(*load_manifests())
    uid = one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert users and users[-1].split(":")[0] == str(uid)
    assert "MODEL_CACHE_DIR=/cache/models" in dockerfile
    assert config_data(docs)["MODEL_CACHE_DIR"] == "/cache/models"
    assert re.search(r"^STOPSIGNAL SIGTERM$", dockerfile, re.M)


def test_kubectl_kustomize_agrees(docs, tmp_path):
    """Where kubectl is installed, the real kustomize renders what this test checks."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("kubectl without kustomize")
    assert proc.returncode == 0, proc.stderr
    rendered = [d for d in yaml.safe_load_all(proc.stdout) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(docs, key=key)


# --------------------------------------------------------------------------------------------
# the checks catch regressions
# --------------------------------------------------------------------------------------------


def _trigger(docs: list[dict]) -> dict:
    return one(docs, "ScaledObject")["spec"]["triggers"][0]


def _container(docs: list[dict]) -> dict:
    return trainer_container(docs)


MUTATIONS: dict[str, Callable[[list[dict]], None]] = {
    "trigger removed": lambda d: one(d, "ScaledObject")["spec"].update(triggers=[]),
    "cpu trigger instead": lambda d: one(d, "ScaledObject")["spec"].update(
        triggers=[{"type": "cpu", "metadata": {"value": "50"}}]
    ),
    "queueLength 5": lambda d: _trigger(d)["metadata"].update(queueLength="5"),
    "in-flight not counted": lambda d: _trigger(d)["metadata"].update(scaleOnInFlight="false"),
    "never scales to zero": lambda d: one(d, "ScaledObject")["spec"].update(minReplicaCount=1),
    "watches another queue": lambda d: _trigger(d)["metadata"].update(
        queueURL="https://sqs.us-east-1.amazonaws.com/123456789012/avatune-events"
    ),
    "region mismatch": lambda d: _trigger(d)["metadata"].update(awsRegion="eu-west-1"),
    "static keys": lambda d: one(d, "TriggerAuthentication").update(
        spec={"secretTargetRef": [{"parameter": "awsAccessKeyID", "name": "aws", "key": "id"}]}
    ),
    "no gpu": lambda d: _container(d)["resources"]["limits"].pop("nvidia.com/gpu"),
    "two gpus": lambda d: _container(d)["resources"]["limits"].update({"nvidia.com/gpu": 2}),
    "short grace": lambda d: one(d, "Deployment")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
    "grace under heartbeat": lambda d: config_data(d).update(HEARTBEAT_SECONDS="150"),
    "config not from configmap": lambda d: _container(d).pop("envFrom"),
    "token from a literal": lambda d: next(e for e in _container(d)["env"] if e["name"] == "HF_TOKEN").update(
        value="hf_x", valueFrom=None
    ),
    "token in configmap": lambda d: config_data(d).update(HF_TOKEN="hf_x"),
    "unknown setting": lambda d: config_data(d).update(HEARTBEAT_SECS="20"),
    "cache not on a volume": lambda d: config_data(d).update(MODEL_CACHE_DIR="/models"),
    "metrics port mismatch": lambda d: config_data(d).update(METRICS_PORT="9200"),
    "no irsa annotation": lambda d: one(d, "ServiceAccount")["metadata"].pop("annotations"),
    "runs as root": lambda d: one(d, "Deployment")["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
    "fixed replicas": lambda d: one(d, "Deployment")["spec"].update(replicas=2),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=list(MUTATIONS))
def test_checks_catch(docs, mutation):
    mutated = copy.deepcopy(docs)
    MUTATIONS[mutation](mutated)
    failed = []
    for check in ALL_CHECKS:
        try:
            check(mutated)
        except (AssertionError, KeyError, TypeError, ValueError):
            failed.append(check.__name__)
    assert failed, f"no check noticed: {mutation}"
