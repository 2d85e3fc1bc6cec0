"""The S3 key layout. Keep it exactly: apps and other services read these keys.

```
users/{user_id}/avatars/{avatar_id}/adapters/                    current adapter files, manifest.json, config.json
users/{user_id}/avatars/{avatar_id}/adapters/training_data/      training documents (tag use_for_training)
users/{user_id}/avatars/{avatar_id}/adapters/versions/{n}/       kept adapter versions
users/{user_id}/avatars/{avatar_id}/adapters/jobs/{job_id}.json  job records
users/{user_id}/avatars/{avatar_id}/adapters/checkpoints/{job_id}/  resumable checkpoints
users/{user_id}/avatars/{avatar_id}/merged/{version}/            adapter {version} merged into its base (fuse jobs)
users/{user_id}/avatars/{avatar_id}/full/{version}/              whole models of full fine-tuning jobs (method full)
users/{user_id}/avatars/{avatar_id}/exports/{version}/{format}/  adapter {version} as gguf or peft (export jobs)
users/{user_id}/avatars/{avatar_id}/adapters/logs/{job_id}/     integrations' logs (report_to; default log_uri)
users/{user_id}/avatars/{avatar_id}/vectorstore_data/            context documents (RAG)
users/{user_id}/vectorstore/                                     the user's vector index (index jobs)
users/{user_id}/files/{file_id}.jsonl                            the user's uploaded files (OpenAI-compatible Files API)
users/{user_id}/fine_tuning_jobs/{job_id}.json                   what an OpenAI-compatible fine-tuning job was asked
                                                                 (its avatar, files, model); the job record stays
                                                                 under the avatar's adapters/jobs/
```
`media/` (per avatar) and `image/` (per user) are reserved and never touched by avatune.
"""

from __future__ import annotations

from contracts.ids import CONTEXT_DOCUMENT_EXTENSIONS, validate_document_name, validate_id


def user_prefix(user_id: str) -> str:
    return f"users/{validate_id(user_id, 'user_id')}/"


def avatar_prefix(user_id: str, avatar_id: str) -> str:
    return f"{user_prefix(user_id)}avatars/{validate_id(avatar_id, 'avatar_id')}/"


def adapter_prefix(user_id: str, avatar_id: str) -> str:
    """Where the current adapter files live (overwritten by each promoted version)."""
    return f"{avatar_prefix(user_id, avatar_id)}adapters/"


def training_data_prefix(user_id: str, avatar_id: str) -> str:
    return f"{adapter_prefix(user_id, avatar_id)}training_data/"


def training_document_key(user_id: str, avatar_id: str, name: str) -> str:
    return f"{training_data_prefix(user_id, avatar_id)}{validate_document_name(name)}"


def adapter_config_key(user_id: str, avatar_id: str) -> str:
    return f"{adapter_prefix(user_id, avatar_id)}config.json"


def adapter_manifest_key(user_id: str, avatar_id: str) -> str:
    return f"{adapter_prefix(user_id, avatar_id)}manifest.json"


def adapter_versions_prefix(user_id: str, avatar_id: str) -> str:
    return f"{adapter_prefix(user_id, avatar_id)}versions/"


def adapter_version_prefix(user_id: str, avatar_id: str, version: int) -> str:
    if version < 1:
        raise ValueError("adapter versions start at 1")
    return f"{adapter_versions_prefix(user_id, avatar_id)}{version}/"


def jobs_prefix(user_id: str, avatar_id: str) -> str:
    return f"{adapter_prefix(user_id, avatar_id)}jobs/"


def job_key(user_id: str, avatar_id: str, job_id: str) -> str:
    return f"{jobs_prefix(user_id, avatar_id)}{validate_id(job_id, 'job_id')}.json"


def checkpoint_prefix(user_id: str, avatar_id: str, job_id: str) -> str:
    return f"{adapter_prefix(user_id, avatar_id)}checkpoints/{validate_id(job_id, 'job_id')}/"


def idempotency_key(user_id: str, avatar_id: str, key_hash: str) -> str:
    return f"{adapter_prefix(user_id, avatar_id)}idempotency/{key_hash}.json"


def feedback_idempotency_key(user_id: str, avatar_id: str, key_hash: str) -> str:
    """The Idempotency-Key record of a feedback POST: apart from the jobs' records, so a key is
    scoped to what it created."""
    return f"{adapter_prefix(user_id, avatar_id)}idempotency/feedback/{key_hash}.json"


def document_name_from_key(key: str, prefix: str) -> str | None:
    """The document name of `key` directly under `prefix`, or None for anything nested or foreign."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix) :]
    if not name or "/" in name:
        return None
    return name


def current_adapter_lock_key(user_id: str, avatar_id: str) -> str:
    """The lock held while the current adapter changes (promote, publish, rollback, prune,
    delete): created with If-None-Match, so changes never interleave (`contracts.adapters`)."""
    return f"{adapter_prefix(user_id, avatar_id)}current.lock"


def active_job_key(user_id: str, avatar_id: str) -> str:
    """Pointer to the avatar's queued or running job, created with If-None-Match: at most one."""
    return f"{adapter_prefix(user_id, avatar_id)}active_job.json"


def avatars_prefix(user_id: str) -> str:
    return f"{user_prefix(user_id)}avatars/"


# Files of a PEFT adapter, kept per version and copied over the current adapter.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
METRICS_FILE = "metrics.json"
CHECKPOINT_COMPLETE_MARKER = "_COMPLETE"


def merged_prefix(user_id: str, avatar_id: str) -> str:
    """Where fuse jobs store merged models: beside `adapters/`, one folder per adapter version."""
    return f"{avatar_prefix(user_id, avatar_id)}merged/"


def merged_version_prefix(user_id: str, avatar_id: str, version: int) -> str:
    """Adapter `version` merged into its base: safetensors weights, config, tokenizer, and
    `MERGED_MANIFEST_FILE` written last."""
    if version < 1:
        raise ValueError("adapter versions start at 1")
    return f"{merged_prefix(user_id, avatar_id)}{version}/"


# Written last under `merged/{version}/`: the merged model is complete once it is there.
MERGED_MANIFEST_FILE = "manifest.json"


def checkpoints_prefix(user_id: str, avatar_id: str) -> str:
    """Every job's checkpoints of the avatar (`checkpoint_prefix` is one job's)."""
    return f"{adapter_prefix(user_id, avatar_id)}checkpoints/"


def training_data_index_key(user_id: str, avatar_id: str) -> str:
    """The API's derived flag index of the avatar's training documents (a cache, safe to delete)."""
    return f"{adapter_prefix(user_id, avatar_id)}training_data_index.json"


def context_data_prefix(user_id: str, avatar_id: str) -> str:
    """The avatar's context documents for retrieval (`.txt`, `.md`, `.jsonl`)."""
    return f"{avatar_prefix(user_id, avatar_id)}vectorstore_data/"


def context_document_key(user_id: str, avatar_id: str, name: str) -> str:
    return f"{context_data_prefix(user_id, avatar_id)}{validate_document_name(name, CONTEXT_DOCUMENT_EXTENSIONS)}"


def vectorstore_prefix(user_id: str) -> str:
    """The user-level vector index built by index jobs (one store per user; every chunk carries its avatar)."""
    return f"{user_prefix(user_id)}vectorstore/"


def version_file_key(user_id: str, avatar_id: str, version: int, name: str) -> str:
    """A file kept beside a version's adapter (`metrics.json`, `samples.json`, `loss.png`)."""
    return f"{adapter_version_prefix(user_id, avatar_id, version)}{name}"


SAMPLES_FILE = "samples.json"
LOSS_CURVE_FILE = "loss.png"


def full_model_prefix(user_id: str, avatar_id: str) -> str:
    """Where full fine-tuning jobs (`method: full`) store whole models: beside `adapters/` and `merged/`."""
    return f"{avatar_prefix(user_id, avatar_id)}full/"


def full_model_version_prefix(user_id: str, avatar_id: str, version: int) -> str:
    """Full fine-tune number `version`: safetensors weights, config, tokenizer, and
    `FULL_MODEL_MANIFEST_FILE` written last (the model is complete once it is there)."""
    if version < 1:
        raise ValueError("full model versions start at 1")
    return f"{full_model_prefix(user_id, avatar_id)}{version}/"


FULL_MODEL_MANIFEST_FILE = "manifest.json"


def training_logs_prefix(user_id: str, avatar_id: str, job_id: str) -> str:
    """Default `artifacts.log_uri` of a job: its integrations' logs (TensorBoard event files, ...)."""
    return f"{adapter_prefix(user_id, avatar_id)}logs/{validate_id(job_id, 'job_id')}/"


def files_prefix(user_id: str) -> str:
    """The user's files area (`/openai/v1/files`): one object per file, named by its id."""
    return f"{user_prefix(user_id)}files/"


def file_key(user_id: str, file_id: str) -> str:
    """A file's object; `.jsonl`, so a job's dataset with `format: auto` parses it as JSONL."""
    return f"{files_prefix(user_id)}{validate_id(file_id, 'file_id')}.jsonl"


def fine_tuning_jobs_prefix(user_id: str) -> str:
    """The user's index of OpenAI-compatible fine-tuning jobs (ids sort by creation time)."""
    return f"{user_prefix(user_id)}fine_tuning_jobs/"


def fine_tuning_job_key(user_id: str, job_id: str) -> str:
    return f"{fine_tuning_jobs_prefix(user_id)}{validate_id(job_id, 'job_id')}.json"


# The formats export jobs write (`exports/{version}/{format}/`).
EXPORT_FORMATS = ("gguf", "peft")


def exports_prefix(user_id: str, avatar_id: str) -> str:
    """Where export jobs store adapter versions in serving formats: beside `adapters/` and `merged/`."""
    return f"{avatar_prefix(user_id, avatar_id)}exports/"


def export_prefix(user_id: str, avatar_id: str, version: int, export_format: str) -> str:
    """Adapter `version` in `export_format` (`gguf`: adapter.gguf, and base.gguf when asked; `peft`:
    the version's own files), `EXPORT_MANIFEST_FILE` written last."""
    if version < 1:
        raise ValueError("adapter versions start at 1")
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; one of {', '.join(EXPORT_FORMATS)}")
    return f"{exports_prefix(user_id, avatar_id)}{version}/{export_format}/"


# Written last under `exports/{version}/{format}/`: the export is complete once it is there.
EXPORT_MANIFEST_FILE = "manifest.json"
