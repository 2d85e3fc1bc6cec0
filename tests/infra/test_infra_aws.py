"""Static checks of the AWS SAM template (infra/aws/template.yaml) and its build.

cfn-lint must pass clean. The template is then parsed (a YAML loader that understands `!Ref`,
`!Sub`, `!GetAtt`...) and each property the deployment relies on is checked: the bucket's
encryption, public access block, versioning and noncurrent-version lifecycle; FIFO train
queue and events queue, each with a DLQ and redrive; the HTTP API's JWT authorizer as the
default with `GET /healthz` open; the events function's partial batch responses; and IAM
least privilege, compared grant by grant, so widening any policy fails a test.

Every check is a function; `test_checks_catch_*` run them on mutated copies of the template to
prove they fail when a policy is widened or a piece is removed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from handlers.idempotency import IDEMPOTENCY_RECORD_TAG

yaml = pytest.importorskip("yaml")

from tests.conftest import ROOT  # noqa: E402

TEMPLATE = ROOT / "infra" / "aws" / "template.yaml"
MAKEFILE = ROOT / "infra" / "aws" / "Makefile"


# --------------------------------------------------------------------------------------------
# loading: CloudFormation short-form tags become their long form ({"Fn::Sub": ...} etc.)
# --------------------------------------------------------------------------------------------


class CfnLoader(yaml.SafeLoader):
    pass


def _construct_intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> dict:
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


CfnLoader.add_multi_constructor("!", _construct_intrinsic)


def load_template(path: Path = TEMPLATE) -> dict:
    return yaml.load(path.read_text(), Loader=CfnLoader)


@pytest.fixture(scope="module")
def template() -> dict:
    assert TEMPLATE.is_file(), "infra/aws/template.yaml is missing"
    return load_template()


def render(expr: Any) -> str:
    """A reference as one comparable string in `${...}` form: `!GetAtt Bucket.Arn` and
    `!Sub "${Bucket.Arn}"` both render as `${Bucket.Arn}`, `!Ref X` as `${X}`."""
    if isinstance(expr, str):
        return expr
    if isinstance(expr, dict) and len(expr) == 1:
        ((key, value),) = expr.items()
        if key == "Ref":
            return "${" + value + "}"
        if key == "Fn::GetAtt":
            return "${" + ".".join(value) + "}"
        if key == "Fn::Sub":
            return value if isinstance(value, str) else value[0]
    return json.dumps(expr, sort_keys=True)


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def resources(t: dict) -> dict[str, dict]:
    return t["Resources"]


def of_type(t: dict, type_: str) -> dict[str, dict]:
    return {name: r for name, r in resources(t).items() if r["Type"] == type_}


def props(t: dict, name: str) -> dict:
    return resources(t)[name].get("Properties", {})


def function_props(t: dict, name: str) -> dict:
    """A function's properties over the template's Globals, as SAM merges them."""
    merged = dict(t.get("Globals", {}).get("Function", {}))
    merged.update(props(t, name))
    return merged


# --------------------------------------------------------------------------------------------
# cfn-lint
# --------------------------------------------------------------------------------------------


def _cfn_lint_command() -> list[str] | None:
    beside = Path(sys.executable).with_name("cfn-lint")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("cfn-lint")
    if found:
        return [found]
    try:
        import cfnlint  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "cfnlint"]


def test_cfn_lint_is_clean():
    command = _cfn_lint_command()
    if command is None:
        pytest.skip("cfn-lint is not installed (pip install '.[dev]')")
    proc = subprocess.run(
        [*command, "--format", "parseable", str(TEMPLATE)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, f"cfn-lint found problems:\n{proc.stdout}\n{proc.stderr}"


def test_template_is_sam():
    t = load_template()
    assert t["Transform"] == "AWS::Serverless-2016-10-31"
    assert t["AWSTemplateFormatVersion"] == "2010-09-09"


# --------------------------------------------------------------------------------------------
# the checks (each raises AssertionError)
# --------------------------------------------------------------------------------------------


def check_bucket(t: dict) -> None:
    buckets = of_type(t, "AWS::S3::Bucket")
    assert list(buckets) == ["Bucket"], f"exactly one bucket expected, got {list(buckets)}"
    bucket = buckets["Bucket"]
    p = bucket["Properties"]
    assert render(p["BucketName"]) == "${BucketName}", "bucket name comes from the BucketName parameter"
    assert bucket.get("DeletionPolicy") == "Retain", "user data must survive a stack deletion"

    rules = p["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rules and all(
        r["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms", "aws:kms:dsse") for r in rules
    ), rules

    block = p["PublicAccessBlockConfiguration"]
    for key in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"):
        assert block.get(key) is True, f"PublicAccessBlockConfiguration.{key} must be true"

    assert p["VersioningConfiguration"]["Status"] == "Enabled"

    lifecycle = [r for r in p["LifecycleConfiguration"]["Rules"] if r.get("Status") == "Enabled"]
    noncurrent = [r for r in lifecycle if "NoncurrentVersionExpiration" in r]
    assert noncurrent, "versioned bucket needs a rule expiring noncurrent versions"
    for rule in noncurrent:
        assert not rule.get("Prefix") and not rule.get("Filter"), "noncurrent versions expire bucket-wide"
    days = noncurrent[0]["NoncurrentVersionExpiration"]["NoncurrentDays"]
    assert render(days) == "${NoncurrentVersionExpirationDays}", "NoncurrentDays must be a parameter"
    param = t["Parameters"]["NoncurrentVersionExpirationDays"]
    assert param["Type"] == "Number" and int(param["MinValue"]) >= 1 and int(param["Default"]) >= 1

    # Idempotency-Key records carry the API's tag; a rule by that tag removes them.
    tag_key, tag_value = IDEMPOTENCY_RECORD_TAG.split("=")
    idempotency = [r for r in lifecycle if {"Key": tag_key, "Value": tag_value} in r.get("TagFilters", [])]
    assert idempotency and "ExpirationInDays" in idempotency[0], "idempotency records need an expiring rule by tag"
    assert render(idempotency[0]["ExpirationInDays"]) == "${IdempotencyRecordExpirationDays}"
    param = t["Parameters"]["IdempotencyRecordExpirationDays"]
    assert param["Type"] == "Number" and int(param["MinValue"]) >= 1 and int(param["Default"]) * 24 >= 24


def check_bucket_policy_grants_nothing(t: dict) -> None:
    for name, policy in of_type(t, "AWS::S3::BucketPolicy").items():
        assert render(policy["Properties"]["Bucket"]) == "${Bucket}"
        statements = as_list(policy["Properties"]["PolicyDocument"]["Statement"])
        for s in statements:
            assert s["Effect"] == "Deny", f"{name}: the bucket policy may only deny, got {s}"
        assert any(
            s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") in ("false", False) for s in statements
        ), "plain-HTTP access must be denied"


def check_queues(t: dict) -> None:
    queues = of_type(t, "AWS::SQS::Queue")
    assert set(queues) == {"TrainQueue", "TrainDeadLetterQueue", "EventsQueue", "EventsDeadLetterQueue"}, set(queues)

    def redrive_target(name: str) -> str:
        policy = queues[name]["Properties"]["RedrivePolicy"]
        assert int(policy["maxReceiveCount"]) == 5, f"{name}: maxReceiveCount must be 5"
        return render(policy["deadLetterTargetArn"])

    train, train_dlq = queues["TrainQueue"]["Properties"], queues["TrainDeadLetterQueue"]["Properties"]
    assert train.get("FifoQueue") is True and train_dlq.get("FifoQueue") is True, "train queue and its DLQ are FIFO"
    assert render(train["QueueName"]).endswith("-train.fifo")
    assert render(train_dlq["QueueName"]).endswith("-train-dlq.fifo")
    assert redrive_target("TrainQueue") == "${TrainDeadLetterQueue.Arn}"
    # The worker heartbeats every HEARTBEAT_SECONDS (20) and extends by VISIBILITY_TIMEOUT_SECONDS.
    assert int(train["VisibilityTimeout"]) == 120
    assert train.get("ContentBasedDeduplication") in (None, False), "the API sends a deduplication id (job_id)"

    events, events_dlq = queues["EventsQueue"]["Properties"], queues["EventsDeadLetterQueue"]["Properties"]
    assert not events.get("FifoQueue") and not events_dlq.get("FifoQueue"), "events queue is a standard queue"
    assert redrive_target("EventsQueue") == "${EventsDeadLetterQueue.Arn}"

    for name, q in queues.items():
        p = q["Properties"]
        assert p.get("SqsManagedSseEnabled") is True or p.get("KmsMasterKeyId"), f"{name}: not encrypted"
        assert "RedrivePolicy" not in p or "DeadLetter" not in name, f"{name}: a DLQ has no DLQ"
    for source, dlq in (("TrainQueue", "TrainDeadLetterQueue"), ("EventsQueue", "EventsDeadLetterQueue")):
        assert int(queues[dlq]["Properties"]["MessageRetentionPeriod"]) >= int(
            queues[source]["Properties"].get("MessageRetentionPeriod", 345600)
        ), f"{dlq} must keep messages at least as long as {source}"


def _http_api_events(t: dict, function: str) -> dict[str, dict]:
    return {n: e for n, e in function_props(t, function).get("Events", {}).items() if e["Type"] == "HttpApi"}


def check_api(t: dict) -> None:
    apis = of_type(t, "AWS::Serverless::HttpApi")
    assert list(apis) == ["HttpApi"], list(apis)
    auth = apis["HttpApi"]["Properties"]["Auth"]
    default = auth.get("DefaultAuthorizer")
    assert default and default in auth["Authorizers"], "the JWT authorizer must be the default authorizer"
    authorizer = auth["Authorizers"][default]
    assert authorizer["IdentitySource"] == "$request.header.Authorization"
    jwt = authorizer["JwtConfiguration"]
    assert render(jwt["issuer"]) == "${JwtIssuer}"
    assert render(jwt["audience"]) == "${JwtAudience}"
    assert t["Parameters"]["JwtAudience"]["Type"] in ("CommaDelimitedList", "String")
    assert t["Parameters"]["JwtIssuer"]["Type"] == "String"
    assert not of_type(t, "AWS::Serverless::Api") and not of_type(t, "AWS::ApiGatewayV2::Route")

    fn = function_props(t, "ApiFunction")
    assert fn["Handler"] == "handlers.lambda_handler.handler"
    assert fn["Runtime"] == "python3.11"
    env = fn["Environment"]["Variables"]
    assert render(env["S3_BUCKET"]) == "${Bucket}"
    assert render(env["TRAIN_QUEUE_NAME"]) == "${TrainQueue.QueueName}"
    assert render(env["EVENTS_QUEUE_NAME"]) == "${EventsQueue.QueueName}"
    assert env["AUTH_MODE"] == "apigateway"
    assert not {"AUTH_JWT_SECRET", "DEV_MODE"} & set(env), "no dev secret or dev mode on AWS"

    events = _http_api_events(t, "ApiFunction")
    assert events, "the API function has no HTTP API route"
    open_routes = []
    for name, event in events.items():
        p = event["Properties"]
        assert render(p["ApiId"]) == "${HttpApi}", f"{name}: route on another API"
        authorizer = p.get("Auth", {}).get("Authorizer")
        if authorizer is not None:
            assert authorizer == "NONE", f"{name}: unexpected authorizer {authorizer}"
            open_routes.append((p["Method"].upper(), p["Path"]))
    assert open_routes == [("GET", "/healthz")], f"only GET /healthz may skip auth, open: {open_routes}"
    assert any(e["Properties"]["Path"] == "/{proxy+}" for e in events.values()), "the API needs a catch-all route"
    for other in of_type(t, "AWS::Serverless::Function"):
        if other != "ApiFunction":
            assert not _http_api_events(t, other), f"{other} must not serve HTTP"


def check_events_function(t: dict) -> None:
    fn = function_props(t, "EventsFunction")
    assert fn["Handler"] == "handlers.events_handler.handler"
    assert fn["Runtime"] == "python3.11"
    sqs = [e for e in fn["Events"].values() if e["Type"] == "SQS"]
    assert len(sqs) == 1, "the events function is driven by exactly one SQS source"
    p = sqs[0]["Properties"]
    assert render(p["Queue"]) == "${EventsQueue.Arn}"
    assert p.get("FunctionResponseTypes") == ["ReportBatchItemFailures"]
    assert p.get("Enabled", True) is True
    visibility = int(props(t, "EventsQueue")["VisibilityTimeout"])
    assert visibility >= 6 * int(fn["Timeout"]), "events queue visibility must be >= 6x the function timeout"
    # The train queue is the trainer's, never a Lambda's.
    for name in of_type(t, "AWS::Serverless::Function"):
        for event in function_props(t, name).get("Events", {}).values():
            if event["Type"] == "SQS":
                assert render(event["Properties"]["Queue"]) == "${EventsQueue.Arn}", name


# -- IAM --------------------------------------------------------------------------------------


def statements_of(role: dict) -> list[dict]:
    out = []
    for policy in role["Properties"].get("Policies", []):
        out.extend(as_list(policy["PolicyDocument"]["Statement"]))
    return out


def grants(role: dict) -> dict[tuple[str, str], Any]:
    """{(action, resource): condition} of every Allow statement; no NotAction/NotResource."""
    out: dict[tuple[str, str], Any] = {}
    for s in statements_of(role):
        assert s["Effect"] == "Allow", f"unexpected {s['Effect']} in a role policy: {s}"
        assert "NotAction" not in s and "NotResource" not in s, f"NotAction/NotResource widen a grant: {s}"
        for action in as_list(s["Action"]):
            for resource in as_list(s["Resource"]):
                out[(action, render(resource))] = s.get("Condition")
    return out


def check_no_side_doors(t: dict) -> None:
    """Roles get permissions only from their inline policies, and functions only from their Role."""
    for kind in (
        "AWS::IAM::Policy",
        "AWS::IAM::ManagedPolicy",
        "AWS::IAM::RolePolicy",
        "AWS::IAM::User",
        "AWS::IAM::Group",
        "AWS::IAM::AccessKey",
    ):
        assert not of_type(t, kind), f"{kind} resources are not expected"
    for name, role in of_type(t, "AWS::IAM::Role").items():
        p = role["Properties"]
        assert not p.get("ManagedPolicyArns"), f"{name}: managed policies are too broad"
        for (action, resource), _ in grants(role).items():
            assert "*" not in action, f"{name}: wildcard action {action}"
            assert resource not in ("*", "${Bucket.Arn}/*") and not resource.startswith("arn:"), (
                f"{name}: resource {resource} is not one of this stack's resources"
            )
    for name, fn in of_type(t, "AWS::Serverless::Function").items():
        p = fn["Properties"]
        assert "Role" in p, f"{name}: SAM would create a role with AWSLambdaBasicExecutionRole (logs on *)"
        assert "Policies" not in p, f"{name}: SAM policy templates bypass the explicit role"


LOG_ACTIONS = ("logs:CreateLogStream", "logs:PutLogEvents")
API_OBJECT_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:GetObjectTagging", "s3:PutObjectTagging")
ADAPTERS = "users/*/avatars/*/adapters/*"
MERGED = "users/*/avatars/*/merged/*"


def _expect(*groups: tuple[tuple[str, ...], str]) -> set[tuple[str, str]]:
    return {(action, resource) for actions, resource in groups for action in actions}


def _role_function(t: dict, function: str) -> str:
    return render(props(t, function)["Role"]).removeprefix("${").removesuffix(".Arn}")


def check_api_role(t: dict) -> None:
    role_name = _role_function(t, "ApiFunction")
    role = resources(t)[role_name]
    g = grants(role)
    expected = _expect(
        (LOG_ACTIONS, "${ApiLogGroup.Arn}"),
        (API_OBJECT_ACTIONS, "${Bucket.Arn}/users/*"),
        (("s3:ListBucket",), "${Bucket.Arn}"),
        (("sqs:SendMessage", "sqs:GetQueueUrl"), "${TrainQueue.Arn}"),
        # job.cancelled for a queued job is published by the API itself.
        (("sqs:SendMessage", "sqs:GetQueueUrl"), "${EventsQueue.Arn}"),
        # callbacks.auth_header is sealed (encrypt only) before the job record is written.
        (("kms:Encrypt",), "${CallbackKey.Arn}"),
    )
    assert set(g) == expected, (
        f"API role grants differ.\n  extra:   {sorted(set(g) - expected)}\n  missing: {sorted(expected - set(g))}"
    )
    assert g[("s3:ListBucket", "${Bucket.Arn}")] == {"StringLike": {"s3:prefix": ["users/*"]}}, (
        "ListBucket must be limited to the users/ prefix"
    )
    for key, condition in g.items():
        if key[0] != "s3:ListBucket":
            assert condition is None, f"unexpected condition on {key}"
    assert render(props(t, "ApiFunction")["LoggingConfig"]["LogGroup"]) == "${ApiLogGroup}"
    assert role["Properties"]["AssumeRolePolicyDocument"]["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]


def check_events_role(t: dict) -> None:
    role = resources(t)[_role_function(t, "EventsFunction")]
    expected = _expect(
        (LOG_ACTIONS, "${EventsLogGroup.Arn}"),
        (
            ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"),
            "${EventsQueue.Arn}",
        ),
        # webhooks: the job record (read only, job records only) and the sealed auth_header (decrypt only)
        (("s3:GetObject",), "${Bucket.Arn}/users/*/avatars/*/adapters/jobs/*"),
        (("s3:ListBucket",), "${Bucket.Arn}"),
        (("kms:Decrypt",), "${CallbackKey.Arn}"),
    )
    g = grants(role)
    assert set(g) == expected, f"events role: extra {sorted(set(g) - expected)}, missing {sorted(expected - set(g))}"
    assert g[("s3:ListBucket", "${Bucket.Arn}")] == {"StringLike": {"s3:prefix": ["users/*/avatars/*/adapters/jobs/*"]}}
    assert all(c is None for k, c in g.items() if k[0] != "s3:ListBucket")
    assert render(props(t, "EventsFunction")["LoggingConfig"]["LogGroup"]) == "${EventsLogGroup}"


def _web_identity_trust(role: dict) -> dict:
    """The IRSA trust policy: a JSON string under !Sub (the condition keys are named after the
    OIDC issuer). `${...}` placeholders stay as they are."""
    doc = role["Properties"]["AssumeRolePolicyDocument"]
    sub = doc["Fn::Sub"]
    text, variables = (sub, {}) if isinstance(sub, str) else sub
    assert set(variables) <= {"OidcIssuer"}
    if "OidcIssuer" in variables:
        assert variables["OidcIssuer"] == {
            "Fn::Select": [1, {"Fn::Split": ["oidc-provider/", {"Ref": "EksOidcProviderArn"}]}]
        }
    return json.loads(text)


def check_irsa_trust(role: dict, namespace_param: str, service_account_param: str) -> None:
    statements = _web_identity_trust(role)["Statement"]
    assert len(statements) == 1, statements
    s = statements[0]
    assert s["Effect"] == "Allow"
    assert s["Principal"] == {"Federated": "${EksOidcProviderArn}"}
    assert s["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert s["Condition"] == {
        "StringEquals": {
            "${OidcIssuer}:sub": f"system:serviceaccount:${{{namespace_param}}}:${{{service_account_param}}}",
            "${OidcIssuer}:aud": "sts.amazonaws.com",
        }
    }, "only the one Kubernetes service account may assume the role"


def check_trainer_role(t: dict) -> None:
    roles = of_type(t, "AWS::IAM::Role")
    role = roles["TrainerRole"]
    assert role.get("Condition") == "HasEksOidc"
    expected = _expect(
        (("s3:GetObject", "s3:PutObject"), "${Bucket.Arn}/users/*"),
        (("s3:DeleteObject",), "${Bucket.Arn}/" + ADAPTERS),
        (("s3:DeleteObject",), "${Bucket.Arn}/" + MERGED),
        (("s3:DeleteObject",), "${Bucket.Arn}/users/*/avatars/*/full/*"),
        # export jobs replace an earlier export of the same version and format
        (("s3:DeleteObject",), "${Bucket.Arn}/users/*/avatars/*/exports/*"),
        (("s3:DeleteObject",), "${Bucket.Arn}/users/*/vectorstore/*"),
        (("s3:GetObjectTagging",), "${Bucket.Arn}/" + ADAPTERS),
        (("s3:ListBucket",), "${Bucket.Arn}"),
        (
            (
                "sqs:ReceiveMessage",
                "sqs:DeleteMessage",
                "sqs:ChangeMessageVisibility",
                "sqs:GetQueueUrl",
                "sqs:GetQueueAttributes",
            ),
            "${TrainQueue.Arn}",
        ),
        (("sqs:SendMessage", "sqs:GetQueueUrl"), "${TrainDeadLetterQueue.Arn}"),
        (("sqs:SendMessage", "sqs:GetQueueUrl"), "${EventsQueue.Arn}"),
        (("kms:Encrypt",), "${CallbackKey.Arn}"),
    )
    g = grants(role)
    assert set(g) == expected, (
        f"trainer role grants differ.\n  extra:   {sorted(set(g) - expected)}\n  missing: {sorted(expected - set(g))}"
    )
    assert g[("s3:ListBucket", "${Bucket.Arn}")] == {"StringLike": {"s3:prefix": ["users/*"]}}
    for key, condition in g.items():
        if key[0] != "s3:ListBucket":
            assert condition is None, f"unexpected condition on {key}"
    check_irsa_trust(role, "TrainerNamespace", "TrainerServiceAccountName")


def check_keda_role(t: dict) -> None:
    role = of_type(t, "AWS::IAM::Role")["KedaOperatorRole"]
    assert role.get("Condition") == "HasEksOidc"
    g = grants(role)
    assert set(g) == {("sqs:GetQueueAttributes", "${TrainQueue.Arn}")}, f"KEDA reads queue depth only: {sorted(g)}"
    check_irsa_trust(role, "KedaNamespace", "KedaServiceAccountName")


def check_roles_are_known(t: dict) -> None:
    assert set(of_type(t, "AWS::IAM::Role")) == {
        "ApiFunctionRole",
        "EventsFunctionRole",
        "TrainerRole",
        "KedaOperatorRole",
    }


def check_outputs(t: dict) -> None:
    outputs = t["Outputs"]
    for name in (
        "ApiUrl",
        "TrainQueueUrl",
        "EventsQueueUrl",
        "TrainQueueName",
        "EventsQueueName",
        "BucketName",
        "Region",
        "ApiFunctionRoleArn",
        "EventsFunctionRoleArn",
        "TrainerRoleArn",
        "KedaOperatorRoleArn",
        "TrainerImage",
        "TrainerRepositoryUri",
    ):
        assert name in outputs, f"output {name} missing"
    assert render(outputs["TrainQueueUrl"]["Value"]) == "${TrainQueue}"
    assert render(outputs["EventsQueueUrl"]["Value"]) == "${EventsQueue}"
    assert render(outputs["TrainerRoleArn"]["Value"]) == "${TrainerRole.Arn}"
    assert render(outputs["KedaOperatorRoleArn"]["Value"]) == "${KedaOperatorRole.Arn}"
    assert "${HttpApi}" in render(outputs["ApiUrl"]["Value"])
    image = render(outputs["TrainerImage"]["Value"])
    assert image == "${TrainerRepository.RepositoryUri}:${TrainerImageTag}", image
    params = t["Parameters"]
    for name in (
        "BucketName",
        "JwtIssuer",
        "JwtAudience",
        "TrainerImageTag",
        "EksOidcProviderArn",
        "NoncurrentVersionExpirationDays",
    ):
        assert name in params, f"parameter {name} missing"


ALL_CHECKS: list[Callable[[dict], None]] = [
    check_bucket,
    check_bucket_policy_grants_nothing,
    check_queues,
    check_api,
    check_events_function,
    check_no_side_doors,
    check_api_role,
    check_events_role,
    check_trainer_role,
    check_keda_role,
    check_roles_are_known,
    check_outputs,
]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_template(template, check):
    check(template)


# --------------------------------------------------------------------------------------------
# the checks catch regressions: each mutation must make at least one check fail
# --------------------------------------------------------------------------------------------


def _role_statement(t: dict, role: str, sid: str) -> dict:
    for s in statements_of(resources(t)[role]):
        if s.get("Sid") == sid:
            return s
    raise KeyError(sid)


def _mutate_trust(t: dict, role: str, old: str, new: str) -> None:
    sub = props(t, role)["AssumeRolePolicyDocument"]["Fn::Sub"]
    sub[0] = sub[0].replace(old, new)


MUTATIONS: dict[str, Callable[[dict], None]] = {
    "api s3 on the whole bucket": lambda t: _role_statement(t, "ApiFunctionRole", "UserObjects").update(
        Resource={"Fn::Sub": "${Bucket.Arn}/*"}
    ),
    "api s3 wildcard action": lambda t: _role_statement(t, "ApiFunctionRole", "UserObjects")["Action"].append("s3:*"),
    "api list without prefix condition": lambda t: _role_statement(t, "ApiFunctionRole", "ListUsers").pop("Condition"),
    "api list prefix widened": lambda t: _role_statement(t, "ApiFunctionRole", "ListUsers").update(
        Condition={"StringLike": {"s3:prefix": ["*"]}}
    ),
    "api may receive from train queue": lambda t: _role_statement(t, "ApiFunctionRole", "SendTrainRequests")[
        "Action"
    ].append("sqs:ReceiveMessage"),
    "api may delete the version history": lambda t: _role_statement(t, "ApiFunctionRole", "UserObjects")[
        "Action"
    ].append("s3:DeleteObjectVersion"),
    "api sends to every queue": lambda t: _role_statement(t, "ApiFunctionRole", "SendTrainRequests").update(
        Resource="*"
    ),
    "api managed policy": lambda t: props(t, "ApiFunctionRole").update(
        ManagedPolicyArns=["arn:aws:iam::aws:policy/AmazonS3FullAccess"]
    ),
    "function gets sam policies": lambda t: props(t, "ApiFunction").update(Policies=["AmazonSQSFullAccess"]),
    "trainer deletes training data": lambda t: _role_statement(t, "TrainerRole", "UserObjects")["Action"].append(
        "s3:DeleteObject"
    ),
    "trainer tags documents": lambda t: _role_statement(t, "TrainerRole", "TrainingDataTags").update(
        Action=["s3:GetObjectTagging", "s3:PutObjectTagging"]
    ),
    "trainer lists the bucket": lambda t: _role_statement(t, "TrainerRole", "ListUsers").pop("Condition"),
    "events lists the bucket": lambda t: _role_statement(t, "EventsFunctionRole", "ListJobRecords").pop("Condition"),
    "trainer purges queue": lambda t: _role_statement(t, "TrainerRole", "ConsumeTrainQueue")["Action"].append(
        "sqs:PurgeQueue"
    ),
    "trainer any service account": lambda t: _mutate_trust(
        t,
        "TrainerRole",
        '"${OidcIssuer}:sub": "system:serviceaccount:${TrainerNamespace}:${TrainerServiceAccountName}",',
        "",
    ),
    "keda may receive": lambda t: _role_statement(t, "KedaOperatorRole", "TrainQueueDepth").update(
        Action=["sqs:GetQueueAttributes", "sqs:ReceiveMessage"]
    ),
    "extra policy resource": lambda t: resources(t).update(
        Extra={
            "Type": "AWS::IAM::Policy",
            "Properties": {
                "PolicyName": "x",
                "Roles": [{"Ref": "ApiFunctionRole"}],
                "PolicyDocument": {"Statement": []},
            },
        }
    ),
    "bucket unencrypted": lambda t: props(t, "Bucket").pop("BucketEncryption"),
    "bucket public": lambda t: props(t, "Bucket")["PublicAccessBlockConfiguration"].update(BlockPublicPolicy=False),
    "bucket unversioned": lambda t: props(t, "Bucket")["VersioningConfiguration"].update(Status="Suspended"),
    "no noncurrent expiry": lambda t: props(t, "Bucket")["LifecycleConfiguration"]["Rules"].pop(0),
    "idempotency records kept": lambda t: props(t, "Bucket")["LifecycleConfiguration"]["Rules"].pop(1),
    "bucket policy allows": lambda t: props(t, "BucketPolicy")["PolicyDocument"]["Statement"].append(
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "*"}
    ),
    "train queue not fifo": lambda t: props(t, "TrainQueue").pop("FifoQueue"),
    "train queue without dlq": lambda t: props(t, "TrainQueue").pop("RedrivePolicy"),
    "events queue maxReceiveCount": lambda t: props(t, "EventsQueue")["RedrivePolicy"].update(maxReceiveCount=50),
    "no default authorizer": lambda t: props(t, "HttpApi")["Auth"].pop("DefaultAuthorizer"),
    "another open route": lambda t: props(t, "ApiFunction")["Events"]["Api"]["Properties"].update(
        Auth={"Authorizer": "NONE"}
    ),
    "healthz behind auth": lambda t: props(t, "ApiFunction")["Events"]["Health"]["Properties"].pop("Auth"),
    "no partial batch responses": lambda t: props(t, "EventsFunction")["Events"]["EventsQueue"]["Properties"].pop(
        "FunctionResponseTypes"
    ),
    "events trigger removed": lambda t: props(t, "EventsFunction").pop("Events"),
    "events reads all of users/": lambda t: _role_statement(t, "EventsFunctionRole", "ReadJobRecords").update(
        Resource={"Fn::Sub": "${Bucket.Arn}/users/*"}
    ),
    "api may decrypt webhook headers": lambda t: _role_statement(t, "ApiFunctionRole", "SealCallbackHeaders").update(
        Action=["kms:Encrypt", "kms:Decrypt"]
    ),
    "api jwt mode": lambda t: props(t, "ApiFunction")["Environment"]["Variables"].update(AUTH_MODE="jwt"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=list(MUTATIONS))
def test_checks_catch(template, mutation):
    mutated = copy.deepcopy(template)
    MUTATIONS[mutation](mutated)
    failed = []
    for check in ALL_CHECKS:
        try:
            check(mutated)
        except (AssertionError, KeyError):
            failed.append(check.__name__)
    assert failed, f"no check noticed: {mutation}"


# --------------------------------------------------------------------------------------------
# the build (sam build runs infra/aws/Makefile)
# --------------------------------------------------------------------------------------------


def test_functions_are_built_by_the_makefile(template):
    makefile = MAKEFILE.read_text()
    targets = set(re.findall(r"^(build-[A-Za-z0-9]+):", makefile, re.M))
    for name in of_type(template, "AWS::Serverless::Function"):
        fn = function_props(template, name)
        meta = resources(template)[name].get("Metadata", {})
        assert meta.get("BuildMethod") == "makefile", name
        assert (TEMPLATE.parent / meta["ContextPath"] / "Makefile").resolve() == MAKEFILE.resolve()
        assert (TEMPLATE.parent / meta["ProjectRootDirectory"]).resolve() == ROOT
        assert (TEMPLATE.parent / fn["CodeUri"]).resolve() == ROOT
        assert f"build-{name}" in targets, f"Makefile has no build-{name}"
        module = fn["Handler"].rsplit(".", 1)[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), fn["Handler"]


def test_makefile_targets_the_functions_architecture(template):
    arch = template["Globals"]["Function"]["Architectures"]
    assert all("Architectures" not in props(template, n) for n in of_type(template, "AWS::Serverless::Function"))
    default = re.search(r"^LAMBDA_ARCH \?= (\S+)$", MAKEFILE.read_text(), re.M)
    assert default, "Makefile must set LAMBDA_ARCH"
    assert {"arm64": "aarch64", "x86_64": "x86_64"}[arch[0]] == default.group(1)
    assert "--python-version 3.11" in MAKEFILE.read_text()


def test_lambda_bundles_requirements():
    sys.path.insert(0, str(ROOT / "infra" / "aws"))
    try:
        import lambda_requirements
    finally:
        sys.path.pop(0)
    api = [lambda_requirements._name(r) for r in lambda_requirements.requirements("api")]
    events = [lambda_requirements._name(r) for r in lambda_requirements.requirements("events")]
    assert {"mangum", "fastapi", "pydantic", "aiobotocore"} <= set(api)
    assert "uvicorn" not in api and not {"torch", "transformers", "peft"} & set(api)
    assert events == ["pydantic"], events


def sam_build(function: str, tmp_path: Path) -> Path:
    """Build `function`'s code as `sam build` does (infra/aws/Makefile's `build-<function>`) with
    the pip step off (dependencies come from this environment); the artifacts folder."""
    make = shutil.which("make")
    if not make:
        pytest.skip("make not installed")
    artifacts = tmp_path / function
    artifacts.mkdir()
    proc = subprocess.run(
        [
            make,
            "-s",
            "-f",
            "infra/aws/Makefile",
            f"build-{function}",
            f"ARTIFACTS_DIR={artifacts}",
            f"PYTHON={sys.executable}",
            "PIP_INSTALL=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return artifacts


def test_api_bundle_serves_without_server_or_training_packages(tmp_path):
    """Build the API function's code as `sam build` does (the Makefile recipe, with the pip step
    off: dependencies come from this environment), then invoke the Lambda handler from that
    folder with an API Gateway v2 event, while uvicorn, torch and the trainer are unimportable."""
    pytest.importorskip("mangum")
    artifacts = sam_build("ApiFunction", tmp_path)
    assert {p.name for p in artifacts.iterdir()} == {"contracts", "handlers"}

    event = {
        "version": "2.0",
        "routeKey": "GET /healthz",
        "rawPath": "/healthz",
        "rawQueryString": "",
        "headers": {"host": "abc123.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "abc123",
            "requestId": "r-1",
            "routeKey": "GET /healthz",
            "stage": "$default",
            "time": "25/Nov/2026:17:00:00 +0000",
            "timeEpoch": 1795626000000,
            "http": {
                "method": "GET",
                "path": "/healthz",
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "curl",
            },
        },
        "isBase64Encoded": False,
    }
    code = f"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('uvicorn', 'torch', 'transformers', 'peft', 'trainer'):
            raise ImportError('not in the API bundle: ' + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(artifacts)!r})
import handlers.lambda_handler as lh
assert lh.__file__.startswith({str(artifacts)!r}), lh.__file__
class Context:
    aws_request_id = 'r-1'
response = lh.handler(json.loads({json.dumps(event)!r}), Context())
print(json.dumps(response))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AWS_ENDPOINT_URL")}
    env.update(AUTH_MODE="apigateway", S3_BUCKET="avatune-test", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
    run = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    response = json.loads(run.stdout.strip().splitlines()[-1])
    assert response["statusCode"] == 200 and json.loads(response["body"]) == {"status": "ok"}
