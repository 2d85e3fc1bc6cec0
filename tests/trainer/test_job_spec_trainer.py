"""The full job spec on the trainer: every field the trainer honours has a check here that fails
if the field is ignored.

Cheap checks call the trainer's functions on the tiny model (4-bit config keying the cached
base, LoRA `target_modules`/`trainable_layers`, precision, full fine-tuning leaving the cached
base alone); the rest goes end to end (train request on the queue -> a real worker -> S3) on one
module-scoped pipeline: a full fine-tune from an s3:// base with TensorBoard logs, a QLoRA job
with every knob set, a job stopped by `max_duration_minutes`, and the clear failures.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import httpx
import pytest
import torch

from contracts.adapter import AdapterSettings
from contracts.adapters import VersionSamples
from contracts.jobs import JobProgress
from contracts.keys import (
    CHECKPOINT_COMPLETE_MARKER,
    FULL_MODEL_MANIFEST_FILE,
    LOSS_CURVE_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    adapter_version_prefix,
    checkpoint_prefix,
    full_model_version_prefix,
    training_logs_prefix,
    user_prefix,
)
from contracts.messages import TrainRequest
from contracts.model_modules import LLAMA_LINEAR_MODULES, known_linear_modules, unknown_modules
from contracts.s3uri import InvalidS3Uri, S3Uri, parse_s3_uri, within_prefixes, within_user_prefix
from tests.conftest import TEST_BUCKET, keys_under
from tests.pipeline import Pipeline, chat_document, wait_for_job

HUB_TOKEN_ENV = "HF_TOKEN_AVATUNE_TEST"
HUB_TOKEN = "hf_secret_" + uuid.uuid4().hex


# -- contracts: s3:// URIs and module names (pure) -------------------------------------------


def test_s3_uris_and_the_tenant_rule() -> None:
    uri = parse_s3_uri("s3://avatune-test/users/u1/data/a.jsonl")
    assert (
        uri == S3Uri("avatune-test", "users/u1/data/a.jsonl") and str(uri) == "s3://avatune-test/users/u1/data/a.jsonl"
    )
    assert parse_s3_uri("s3://avatune-test/users/u1/models/tiny", prefix=True).key == "users/u1/models/tiny/"
    assert within_user_prefix("s3://avatune-test/users/u1/data/a.jsonl", "avatune-test", "u1")
    assert not within_user_prefix("s3://avatune-test/users/u10/a.jsonl", "avatune-test", "u1")
    assert not within_user_prefix("s3://other-bucket/users/u1/a.jsonl", "avatune-test", "u1")
    assert not within_user_prefix("s3://avatune-test/users/u1/", "avatune-test", "u1")  # the prefix itself
    assert not within_user_prefix("s3://avatune-test/users/u1/a", "avatune-test", "../u1")
    for bad in (
        "s3://avatune-test/users/u1/../u2/a.jsonl",
        "s3://avatune-test/users/u1//a",
        "http://x/y",
        "s3://Bad_Bucket/a",
        "s3://avatune-test//users/u1/a",
        "s3://avatune-test/users/u1/./a",
        "s3://avatune-test/users/u1/a\\b",
        "s3://avatune-test/a\nb",
        "s3://avatune-test/folder/",
    ):
        with pytest.raises(InvalidS3Uri):
            parse_s3_uri(bad)
        assert not within_user_prefix(bad, "avatune-test", "u1")
    allowed = ["s3://shared-models/bases/", "not-a-uri"]
    assert within_prefixes("s3://shared-models/bases/llama/", allowed)
    assert not within_prefixes("s3://shared-models/basesX/llama/", allowed)
    assert not within_prefixes("s3://shared-models/bases/../secret/", allowed)


def test_known_module_names_of_the_llama_family() -> None:
    assert known_linear_modules(None) == LLAMA_LINEAR_MODULES
    assert known_linear_modules("meta-llama/Llama-3.2-1B-Instruct") == LLAMA_LINEAR_MODULES
    assert known_linear_modules("s3://b/users/u/model/") is None  # the trainer checks the loaded model
    assert known_linear_modules("someorg/unknown-arch") is None
    assert unknown_modules(["q_proj", "model.layers.0.mlp.down_proj", "qkv", "dense"], None) == ["qkv", "dense"]
    assert unknown_modules(["anything"], "s3://b/users/u/m/") == []


# -- trainer functions on the tiny model ---------------------------------------------------------


class _Control:
    """A TrainingControl that never stops and never checkpoints."""

    def stop_reason(self) -> str | None:
        return None

    def report(self, progress: JobProgress) -> None:
        pass

    def checkpoint_due(self, step: int) -> bool:
        return False

    def checkpoint_saved(self, local_dir: Path, step: int) -> None:
        pass


def _examples(n: int = 8):
    from trainer.dataset import IGNORE_INDEX, TokenizedExample

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(10, 400, (24,), generator=g).tolist()
        rows.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] + ids[1:]))
    return rows


def test_qlora_options_key_the_cached_base(tiny_model_dir: Path) -> None:
    from trainer.base_model import BaseModelCache, QuantOptions

    cache = BaseModelCache()
    nf4 = cache.get(str(tiny_model_dir), "qlora", QuantOptions("nf4", True, "bfloat16"))
    assert nf4.method == "qlora", nf4.fallback_reason
    config = nf4.model.config.quantization_config
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("nf4", True)
    assert cache.get(str(tiny_model_dir), "qlora", QuantOptions("nf4", True, "bfloat16")) is nf4 and cache.loads == 1
    fp4 = cache.get(str(tiny_model_dir), "qlora", QuantOptions("fp4", False, "float32"))
    assert cache.loads == 2  # another quantisation: reloaded
    config = fp4.model.config.quantization_config
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant, config.bnb_4bit_compute_dtype) == (
        "fp4",
        False,
        torch.float32,
    )
    q_proj = fp4.model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.quant_state.quant_type == "fp4" and q_proj.compute_dtype == torch.float32
    assert fp4.quant_metrics() == {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float32"}


def test_lora_target_modules_and_trainable_layers(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from trainer.base_model import BaseModelCache
    from trainer.errors import JobFailure
    from trainer.training import train_adapter

    base = BaseModelCache().get(str(tiny_model_dir), "lora")
    cfg = AdapterSettings(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        learning_rate=1e-3,
        num_epochs=1,
        batch_size=4,
        warmup_ratio=0.0,
        seed=1,
        max_steps=1,
        target_modules=["q_proj", "v_proj"],
        trainable_layers=[1],
    )
    outcome = train_adapter(base, cfg, _examples(), [], tmp_path / "w", _Control())
    assert outcome.completed
    with safe_open(str(outcome.adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".layers.1." in k for k in keys), keys
    assert {k.split(".layers.1.")[1].split(".")[1] for k in keys} == {"q_proj", "v_proj"}
    assert outcome.metrics.trainable_layers == [1] and outcome.metrics.target_modules == ["q_proj", "v_proj"]

    with pytest.raises(JobFailure, match=r"\['qkv_proj', 'dense'\].*q_proj"):
        train_adapter(
            base,
            cfg.model_copy(update={"target_modules": ["q_proj", "qkv_proj", "dense"]}),
            _examples(),
            [],
            tmp_path / "x",
            _Control(),
        )
    with pytest.raises(JobFailure, match=r"trainable_layers \[5\].*2 decoder layers"):
        train_adapter(
            base, cfg.model_copy(update={"trainable_layers": [0, 5]}), _examples(), [], tmp_path / "y", _Control()
        )
    assert not hasattr(base.model, "peft_config")  # the cached base came back clean


def test_precision_reaches_the_trainer() -> None:
    from trainer.training import resolve_precision, training_arguments

    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == ("fp32", None)
    assert resolve_precision("bf16", cpu) == ("bf16", None)
    precision, note = resolve_precision("fp16", cpu)
    assert precision == "fp32" and "fp16 needs a GPU" in note
    cfg = AdapterSettings(
        batch_size=1,
        num_epochs=1,
        learning_rate=1e-3,
        seed=0,
        precision="bf16",
        gradient_accumulation_steps=3,
        max_steps=7,
        gradient_checkpointing=True,
    )
    args = training_arguments(cfg, Path("/tmp/unused"), cpu)
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    assert (args.bf16, args.fp16, args.gradient_accumulation_steps, args.max_steps, checkpointing) == (
        True,
        False,
        3,
        7,
        True,
    )
    args = training_arguments(cfg.model_copy(update={"precision": "fp32", "max_steps": None}), Path("/tmp/unused"), cpu)
    assert (args.bf16, args.fp16, args.max_steps) == (False, False, -1)


def test_full_finetune_trains_only_its_layers_and_never_the_cached_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from trainer.base_model import BaseModelCache, BaseRef
    from trainer.full_finetune import train_full

    cache = BaseModelCache()
    cached = cache.get(str(tiny_model_dir), "lora")
    before = {k: v.clone() for k, v in cached.model.state_dict().items()}
    cfg = AdapterSettings(
        learning_rate=5e-3,
        num_epochs=1,
        batch_size=4,
        warmup_ratio=0.0,
        seed=1,
        max_steps=2,
        trainable_layers=[0],
        precision="fp32",
        method="full",
    )
    outcome = train_full(
        cache, BaseRef(path=str(tiny_model_dir)), cfg, _examples(), _examples(2), tmp_path / "w", _Control()
    )
    assert outcome.completed and outcome.metrics.method == "full" and outcome.metrics.steps == 2
    saved = load_file(str(outcome.adapter_dir / "model.safetensors"))
    changed = {k for k, v in saved.items() if k in before and not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.0.") for k in changed), changed
    assert all(torch.equal(v, cached.model.state_dict()[k]) for k, v in before.items())  # the cache untouched
    assert cache.loads == 1
    assert (outcome.adapter_dir / "tokenizer.json").exists()


# -- end to end: the queue, a real worker, S3 ------------------------------------------------


HUB_REPO = "avatune/tiny-revisions"


def _fake_hub_cache(root: Path) -> Path:
    """A Hugging Face cache holding two revisions of HUB_REPO (offline): `main` with 2 decoder
    layers, `v2` with 3, so a job can tell which revision it got."""
    from trainer.tiny_model import write_tiny_model

    repo = root / ("models--" + HUB_REPO.replace("/", "--"))
    for revision, layers, commit in (("main", 2, "a" * 40), ("v2", 3, "b" * 40)):
        write_tiny_model(repo / "snapshots" / commit, num_layers=layers)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return root


@pytest.fixture(scope="module")
def worker(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory):
    cache = _fake_hub_cache(tmp_path_factory.mktemp("hub-cache"))
    proc = pipeline.start_worker(
        **{
            HUB_TOKEN_ENV: HUB_TOKEN,
            "CHECKPOINT_EVERY_STEPS": "0",
            "MODEL_CACHE_DIR": str(cache),
            "HF_HUB_OFFLINE": "1",
        }
    )
    yield proc
    assert proc.poll() is None, "the worker died:\n" + pipeline.worker_log()


def _send(pipeline: Pipeline, api, **spec) -> str:
    """A train request straight on the queue (the spec as another service would send it)."""
    request = TrainRequest.model_validate(
        {
            "schema": "avatune.train-request/v1",
            "job_id": "spec-" + uuid.uuid4().hex[:10],
            "user_id": api.user_id,
            "avatar_id": api.avatar_id,
            **spec,
        }
    )
    return pipeline.send(request)


def _run(pipeline: Pipeline, api, **spec) -> dict:
    job_id = _send(pipeline, api, **spec)
    done, _ = wait_for_job(api, job_id, {"succeeded", "failed", "cancelled"}, timeout=300, pipeline=pipeline)
    return done


def _upload_dir(s3, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), TEST_BUCKET, prefix + path.relative_to(local).as_posix())


def _event_files(s3, prefix: str) -> list[str]:
    return [k for k in keys_under(s3, prefix) if "events.out.tfevents" in k]


def test_full_finetune_from_an_s3_base_with_tensorboard(
    pipeline: Pipeline, worker, s3, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with pipeline.client() as api:
        assert api.put_doc("chat.jsonl", chat_document(20)).status_code == 201
        base_prefix = f"{user_prefix(api.user_id)}models/tiny/"
        _upload_dir(s3, tiny_model_dir, base_prefix)
        base_uri = f"s3://{TEST_BUCKET}/{base_prefix}"
        done = _run(
            pipeline,
            api,
            method="full",
            precision="bf16",
            trainable_layers=[1],
            base_model={"name": base_uri, "token_env": HUB_TOKEN_ENV},
            tuning={
                "max_steps": 2,
                "gradient_accumulation_steps": 2,
                "batch_size": 2,
                "learning_rate": 0.01,
                "eval_fraction": 0.5,
                "warmup_ratio": 0.0,
            },
            integrations={"report_to": ["tensorboard"]},
        )
        assert done["status"] == "succeeded", done
        m = done["metrics"]
        assert done["adapter_version"] == 1 and m["method"] == "full"
        # Its version numbers a model under full/, not an adapter version's files.
        assert done["links"] == {"model": f"{api.base}/full-models/1"}
        assert m["precision"] == "bf16" and m["dtype"] == "bfloat16"
        assert m["steps"] == 2 and m["max_steps"] == 2 and m["gradient_accumulation_steps"] == 2
        # eval_fraction 0.5 (not EVAL_FRACTION 0.1) of 20 conversations, by their stable keys
        assert m["eval_examples"] + m["train_examples"] == 20 and m["eval_examples"] >= 5
        assert m["held_out_rule"] == "conversation-hash/v1" and m["held_out_cutoff"] == 0.5
        assert m["base_model"] == base_uri and m["trainable_layers"] == [1]
        prefix = full_model_version_prefix(api.user_id, api.avatar_id, 1)
        assert m["full_model_prefix"] == prefix
        # No adapter was published: a full job saves a whole model under full/{version}/.
        assert not keys_under(s3, adapter_version_prefix(api.user_id, api.avatar_id, 1))

        names = {k[len(prefix) :] for k in keys_under(s3, prefix)}
        assert {FULL_MODEL_MANIFEST_FILE, "config.json", "model.safetensors", "tokenizer.json"} <= names
        # Like an adapter version: samples (base vs trained, from the same copy) and the loss curve.
        assert {SAMPLES_FILE, LOSS_CURVE_FILE} <= names
        samples = VersionSamples.model_validate_json(
            s3.get_object(Bucket=TEST_BUCKET, Key=prefix + SAMPLES_FILE)["Body"].read()
        )
        assert samples.job_id == done["id"] and len(samples.samples) == m["samples"] > 0
        assert all(x.prompt and x.reference and x.prompt_tokens > 0 for x in samples.samples)
        png = s3.get_object(Bucket=TEST_BUCKET, Key=prefix + LOSS_CURVE_FILE)["Body"].read()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert [step for step, _ in m["loss_curve"]["eval"]][0] == 0 and m["loss_curve"]["eval"][-1][0] == 2
        manifest = json.loads(s3.get_object(Bucket=TEST_BUCKET, Key=prefix + FULL_MODEL_MANIFEST_FILE)["Body"].read())
        assert manifest["job_id"] == done["id"] and manifest["base_model"] == base_uri and manifest["version"] == 1
        assert set(manifest["files"]) == names - {FULL_MODEL_MANIFEST_FILE, ".claim"}
        view = api.get(done["links"]["model"]).json()  # the files, through the API
        assert {f["name"]: f["sha256"] for f in view["files"]} == manifest["files"] and view["metrics"][
            "method"
        ] == "full"
        url = next(f["url"] for f in view["files"] if f["name"] == "model.safetensors")
        (tmp_path / "model.safetensors").write_bytes(httpx.get(url).content)
        with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # precision bf16
        saved = load_file(str(tmp_path / "model.safetensors"))
        original = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
        changed = {k for k, v in saved.items() if not torch.equal(v, original[k].to(torch.bfloat16))}
        assert changed and all(k.startswith("model.layers.1.") for k in changed), changed  # trainable_layers

        # report_to tensorboard: event files under the default log prefix.
        assert _event_files(s3, training_logs_prefix(api.user_id, api.avatar_id, done["id"]))
        # The hub token was read from the named variable and never written anywhere.
        record = (
            s3.get_object(
                Bucket=TEST_BUCKET,
                Key=f"{user_prefix(api.user_id)}avatars/{api.avatar_id}/adapters/jobs/{done['id']}.json",
            )["Body"]
            .read()
            .decode()
        )
        assert HUB_TOKEN not in record and HUB_TOKEN_ENV in record
        assert HUB_TOKEN not in pipeline.worker_log()


def test_qlora_job_honours_its_knobs(pipeline: Pipeline, worker, s3) -> None:
    from safetensors import safe_open

    with pipeline.client() as api:
        assert api.put_doc("chat.jsonl", chat_document(12)).status_code == 201
        log_prefix = f"{user_prefix(api.user_id)}tb/run-1/"
        done = _run(
            pipeline,
            api,
            method="qlora",
            qlora={"quant_type": "fp4", "double_quant": False, "compute_dtype": "float32"},
            target_modules=["q_proj", "v_proj"],
            trainable_layers=[0],
            precision="fp32",
            config={"r": 4, "lora_alpha": 8},
            tuning={
                "max_steps": 3,
                "num_epochs": 50,
                "batch_size": 4,
                "gradient_checkpointing": True,
                "learning_rate": 0.01,
            },
            integrations={"report_to": ["tensorboard"]},
            artifacts={"log_uri": f"s3://{TEST_BUCKET}/{log_prefix}"},
        )
        assert done["status"] == "succeeded", done
        m = done["metrics"]
        assert (m["quant_type"], m["double_quant"], m["compute_dtype"], m["method"]) == (
            "fp4",
            False,
            "float32",
            "qlora",
        )
        assert m["steps"] == 3 and m["epochs"] < 50  # max_steps overrides num_epochs
        assert m["gradient_checkpointing"] is True and m["precision"] == "fp32"
        assert m["log_uri"] == f"s3://{TEST_BUCKET}/{log_prefix}" and _event_files(s3, log_prefix)
        assert not _event_files(s3, training_logs_prefix(api.user_id, api.avatar_id, done["id"]))
        version = api.get(f"{api.base}/adapter/versions").json()["items"][0]
        prefix = adapter_version_prefix(api.user_id, api.avatar_id, version["version"])
        path = Path(pipeline.logs) / f"adapter-{done['id']}.safetensors"
        s3.download_file(TEST_BUCKET, prefix + "adapter_model.safetensors", str(path))
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        assert keys and all(".layers.0." in k and (".q_proj." in k or ".v_proj." in k) for k in keys), keys


def test_hub_base_revision_is_loaded(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        assert api.put_doc("chat.jsonl", chat_document(8)).status_code == 201
        # Layer 2 exists only in revision v2 of the repo (main has layers 0 and 1).
        done = _run(
            pipeline,
            api,
            base_model={"name": HUB_REPO, "revision": "v2"},
            method="lora",
            trainable_layers=[2],
            config={"r": 4},
            tuning={"max_steps": 1},
        )
        assert done["status"] == "succeeded", done["error"]
        assert done["metrics"]["base_model"] == HUB_REPO and done["metrics"]["base_model_revision"] == "v2"
        version = s3.get_object(
            Bucket=TEST_BUCKET,
            Key=adapter_version_prefix(api.user_id, api.avatar_id, done["adapter_version"]) + METRICS_FILE,
        )["Body"].read()
        assert json.loads(version)["base_model"] == HUB_REPO  # the adapter records the base it was trained on
        done = _run(
            pipeline,
            api,
            base_model={"name": HUB_REPO},
            method="lora",
            trainable_layers=[2],
            config={"r": 4},
            tuning={"max_steps": 1},
        )
        assert done["status"] == "failed" and "trainable_layers [2] do not exist" in done["error"], done


def test_max_duration_stops_keeps_the_checkpoint_and_fails(pipeline: Pipeline, worker, s3) -> None:
    with pipeline.client() as api:
        assert api.put_doc("chat.jsonl", chat_document(8)).status_code == 201
        done = _run(
            pipeline,
            api,
            method="lora",
            config={"r": 4},
            tuning={"max_steps": 100000, "batch_size": 2},
            resources={"max_duration_minutes": 0.005},
        )
        assert done["status"] == "failed", done
        assert "exceeded max_duration_minutes=0.005" in done["error"]
        keys = keys_under(s3, checkpoint_prefix(api.user_id, api.avatar_id, done["id"]))
        assert any(k.endswith("/" + CHECKPOINT_COMPLETE_MARKER) for k in keys), keys
        assert done["progress"]["step"] < 100000
        assert api.get(f"{api.base}/adapter/versions").json()["items"] == []


def test_impossible_specs_fail_clearly(pipeline: Pipeline, worker, s3, tiny_model_dir: Path) -> None:
    with pipeline.client() as api, pipeline.client() as other:
        assert api.put_doc("chat.jsonl", chat_document(8)).status_code == 201
        foreign = f"{user_prefix(other.user_id)}models/tiny/"
        _upload_dir(s3, tiny_model_dir, foreign)
        cases = [
            (dict(target_modules=["q_proj", "wqkv"]), "['wqkv']"),
            (dict(method="full", qlora={"quant_type": "nf4"}), "qlora options (quant_type)"),
            (dict(method="full", promote="if_better"), "promote if_better needs a LoRA method"),
            (
                dict(base_model={"name": str(tiny_model_dir), "token_env": "HF_TOKEN_NO_SUCH"}),
                "'HF_TOKEN_NO_SUCH', which is not set",
            ),
            (dict(base_model={"name": f"s3://{TEST_BUCKET}/{foreign}"}), "outside your prefix"),
            *(
                [(dict(integrations={"report_to": ["wandb"]}), "report_to wandb needs the wandb package on the worker")]
                if importlib.util.find_spec("wandb") is None
                else []
            ),
            (
                dict(
                    artifacts={"log_uri": f"s3://{TEST_BUCKET}/{foreign}logs/"},
                    integrations={"report_to": ["tensorboard"]},
                ),
                "log_uri must lie inside",
            ),
        ]
        for spec, reason in cases:
            done = _run(pipeline, api, config={"r": 4}, tuning={"max_steps": 1}, **spec)
            assert done["status"] == "failed" and reason in done["error"], (spec, done)
        assert api.get(f"{api.base}/adapter/versions").json()["items"] == []
