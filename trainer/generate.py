"""Generation jobs: try an adapter version (or the base alone) on a prompt.

    the job's request (GenerateParams) -> the adapter version, downloaded (sha256 checked)
    -> [rag: passages from the avatar's vector index, put into a system message]
    -> the worker's cached base + the adapter as a PeftModel -> one greedy completion
    (trainer.completion) -> the adapter removed again -> the job's `result`

The cached base is shared with training jobs and kept loaded: the adapter's LoRA layers are
injected for this job only and unloaded afterwards (as training does), so the next job meets
the untouched base. `GenerateWork` is the `JobWork` the runner runs for a `GenerateRequest`;
claim, lease, heartbeat, cancel, SIGTERM, retries and events are the runner's. For trying an
adapter, not for serving traffic: one request, greedy, bounded by MAX_GENERATION_TOKENS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import ValidationError

from contracts.adapters import VersionMetrics
from contracts.jobs import JobProgress, JobRecord
from contracts.keys import ADAPTER_FILES
from contracts.messages import GenerateParams
from trainer.artifacts import sha256_file
from trainer.base_model import BaseRef, LoadedBase, QuantOptions, resolve_base
from trainer.completion import Message, PromptTooLong, generate_completion, render_prompt
from trainer.errors import JobFailure
from trainer.job_runner import Delivery, JobRunner, Outcome, is_cuda_oom, report_progress

log = logging.getLogger("avatune.trainer")

# Progress steps: request resolved, adapter downloaded, passages retrieved, generated.
GENERATE_STEPS = 4
BASE_ONLY = 0  # adapter_version 0: the base model alone

RAG_INSTRUCTION = (
    "Answer the user's question using the context passages below when they are relevant. "
    "If they do not contain the answer, say so instead of guessing."
)


# -- prompt building (pure) -------------------------------------------------------------------


def query_of(messages: Sequence[Message]) -> str:
    """What to retrieve passages for: the last user message."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    raise ValueError("a RAG generation needs a user message to retrieve passages for")


def rag_context(passages: Sequence[dict[str, Any]]) -> str:
    """The passages as one block of text, numbered and with their sources."""
    blocks = []
    for number, passage in enumerate(passages, start=1):
        source = passage.get("source")
        heading = f"[{number}]" + (f" (source: {source})" if source else "")
        blocks.append(f"{heading}\n{str(passage.get('text', '')).strip()}")
    return RAG_INSTRUCTION + "\n\nContext:\n\n" + "\n\n".join(blocks)


def build_rag_messages(messages: Sequence[Message], passages: Sequence[dict[str, Any]]) -> list[Message]:
    """`messages` with the passages in a system message ahead of the conversation. An
    existing leading system message keeps its text and gets the context appended (many chat
    templates accept one system message, first). No passages: the messages unchanged."""
    chat = [dict(m) for m in messages]
    if not passages:
        return chat
    context = rag_context(passages)
    if chat and chat[0]["role"] == "system":
        chat[0]["content"] = chat[0]["content"].rstrip() + "\n\n" + context
        return chat
    return [{"role": "system", "content": context}, *chat]


def fit_rag_messages(
    tokenizer: Any, messages: Sequence[Message], passages: Sequence[dict[str, Any]], max_prompt_tokens: int | None
) -> tuple[list[Message], list[dict[str, Any]]]:
    """`build_rag_messages` with as many of the (best-first) passages as fit `max_prompt_tokens`
    once rendered; the messages and the passages used. None: no limit."""
    used = list(passages)
    while True:
        chat = build_rag_messages(messages, used)
        if max_prompt_tokens is None or not used:
            return chat, used
        tokens = len(tokenizer(render_prompt(tokenizer, chat), add_special_tokens=False)["input_ids"])
        if tokens <= max_prompt_tokens:
            return chat, used
        used.pop()  # the weakest passage goes first


# -- the job ----------------------------------------------------------------------------------


def _remove_adapter(peft_model: Any) -> Any:
    """The base model with the adapter's LoRA layers taken out again (shared with training)."""
    from trainer.training import _remove_lora

    return _remove_lora(peft_model)


class GenerateWork:
    """The `JobWork` of a generation job (see the module docstring)."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def __call__(self, job: JobRecord, heartbeat: Any, scratch: Path, delivery: Delivery) -> str:
        runner = self.runner
        settings = runner.settings
        user_id, avatar_id = job.user_id, job.avatar_id
        control = runner.control(job, heartbeat)

        def progress(step: int) -> JobProgress:
            return report_progress(control, step, GENERATE_STEPS)

        progress(0)
        if job.result is not None:  # a retry of a job that already wrote its answer
            log.info("generate job %s: result already written", job.id)
            runner.finish(
                job,
                "succeeded",
                adapter_version=job.adapter_version,
                progress=progress(GENERATE_STEPS),
                metrics=job.metrics,
            )
            return Outcome.DONE
        try:
            params = GenerateParams.model_validate(job.request)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise JobFailure(
                f"invalid generation request: {'.'.join(map(str, first['loc'])) or '<root>'}: {first['msg']}"
            ) from None

        version = params.adapter_version
        if version is None:  # "the current version", resolved now and recorded
            manifest = runner.artifacts.current_manifest(user_id, avatar_id)
            if manifest is None:
                raise JobFailure(
                    f"avatar {avatar_id!r} has no trained adapter; train one first, or ask for "
                    "adapter_version 0 to try the base model alone"
                )
            version = manifest.current_version
        if job.adapter_version != version:
            job = runner.jobs.update(user_id, avatar_id, job.id, lambda r: _with_version(r, version))
        progress(1)

        adapter_dir: Path | None = None
        meta: VersionMetrics | None = None
        if version != BASE_ONLY:
            adapter_dir = scratch / "adapter"
            meta = self._download(user_id, avatar_id, version, adapter_dir)
        ref = self._base_ref(job, meta)
        progress(2)
        if reason := control.stop_reason():
            return runner.stopped(job, reason, delivery)

        max_new_tokens = min(params.max_new_tokens, settings.max_generation_tokens)
        messages: list[Message] = params.chat()
        passages: list[dict[str, Any]] | None = None
        if params.rag is not None:
            passages = self._retrieve(job, messages, params.rag.top_k, params.rag.score_threshold)
        progress(3)
        if reason := control.stop_reason():
            return runner.stopped(job, reason, delivery)

        loads_before = runner.models.loads
        base = self._cached_base(ref, meta)
        if passages is not None:
            window = getattr(base.model.config, "max_position_embeddings", None)
            messages, passages = fit_rag_messages(
                base.tokenizer, messages, passages, None if window is None else window - max_new_tokens
            )
        try:
            text, facts = self._generate(base, adapter_dir, messages, max_new_tokens)
        except PromptTooLong as exc:
            raise JobFailure(str(exc)) from None
        except Exception as exc:
            if is_cuda_oom(exc):
                raise JobFailure("out of GPU memory while generating: lower max_new_tokens or the prompt") from None
            raise

        result: dict[str, Any] = {
            "completion": text,
            "adapter_version": version,
            "prompt_tokens": facts["prompt_tokens"],
            "completion_tokens": facts["completion_tokens"],
            "max_new_tokens": max_new_tokens,
            "seconds": facts["seconds"],
            "finish_reason": facts["finish_reason"],
            "prompt": facts["prompt"],
            "base_model": ref.name,
        }
        if passages is not None:
            result["passages"] = passages
        metrics = {
            "prompt_tokens": facts["prompt_tokens"],
            "completion_tokens": facts["completion_tokens"],
            "generate_seconds": facts["seconds"],
            "base_model_reused": runner.models.loads == loads_before,
        }
        runner.jobs.update(user_id, avatar_id, job.id, lambda r: _with_result(r, result))
        runner.finish(job, "succeeded", adapter_version=version, progress=progress(GENERATE_STEPS), metrics=metrics)
        log.info("generate job %s: %d tokens with adapter version %d", job.id, facts["completion_tokens"], version)
        return Outcome.DONE

    def _download(self, user_id: str, avatar_id: str, version: int, dest: Path) -> VersionMetrics:
        """Fetch an adapter version's files and check them against their sha256; its metrics."""
        runner = self.runner
        meta = runner.artifacts.download_version(user_id, avatar_id, version, dest)
        if meta is None:
            kept = runner.artifacts.versions(user_id, avatar_id)
            raise JobFailure(
                f"adapter version {version} does not exist for avatar {avatar_id!r} "
                f"(kept versions: {', '.join(map(str, kept)) or 'none'})"
            )
        for name in ADAPTER_FILES:
            expected = meta.files.get(name)
            if expected is not None and sha256_file(dest / name) != expected:
                raise RuntimeError(f"adapter version {version}: {name} does not match its sha256 (retrying)")
        if meta.metrics.get("method") == "full":
            raise JobFailure(f"version {version} is a fully fine-tuned model, not an adapter")
        return meta

    def _base_ref(self, job: JobRecord, meta: VersionMetrics | None) -> BaseRef:
        """The base to generate on: the one the adapter version was trained on (its recorded
        name and revision, resolved as a train job resolves its spec's base), or BASE_MODEL
        for the base alone."""
        settings, runner = self.runner.settings, self.runner
        asked = None
        if meta is not None and meta.base_model:
            asked = SimpleNamespace(
                name=meta.base_model, revision=meta.metrics.get("base_model_revision"), token_env=None
            )
        return resolve_base(
            asked,
            default=settings.base_model,
            user_id=job.user_id,
            bucket=settings.s3_bucket,
            allowed_prefixes=settings.allowed_base_prefixes(),
            s3=runner.s3,
            cache_dir=settings.model_cache_dir,
        )

    def _cached_base(self, ref: BaseRef, meta: VersionMetrics | None) -> LoadedBase:
        """The worker's cached base, asked for as training asks for it (same method and 4-bit
        options), so the base a training job left loaded is reused rather than loaded again."""
        settings = self.runner.settings
        metrics = meta.metrics if meta is not None else {}
        if meta is None:
            method = settings.default_method if settings.default_method in ("lora", "qlora") else "lora"
        else:  # a qlora job that fell back to lora (no bitsandbytes) still asked for qlora
            method = "qlora" if metrics.get("method") == "qlora" or metrics.get("fallback") else "lora"
        quant = QuantOptions(
            metrics.get("quant_type") or "nf4",
            True if metrics.get("double_quant") is None else bool(metrics["double_quant"]),
            metrics.get("compute_dtype"),
        )
        return self.runner.models.get(ref.path, method, quant, revision=ref.revision, token=ref.token)

    def _retrieve(
        self, job: JobRecord, messages: list[Message], top_k: int, score_threshold: float | None
    ) -> list[dict[str, Any]]:
        """The passages for the conversation's last user message, best first."""
        try:
            query = query_of(messages)
        except ValueError as exc:
            raise JobFailure(str(exc)) from None
        from trainer.rag.search import search  # lazily: its embedding model loads only for RAG jobs

        found = search(self.runner, job.user_id, job.avatar_id, query, top_k, score_threshold, {})
        return [_passage(p) for p in found]

    def _generate(
        self, base: Any, adapter_dir: Path | None, messages: list[Message], max_new_tokens: int
    ) -> tuple[str, Any]:
        if adapter_dir is None:
            return generate_completion(base.model, base.tokenizer, messages, max_new_tokens)
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base.model, adapter_dir, is_trainable=False)
        try:
            return generate_completion(peft_model, base.tokenizer, messages, max_new_tokens)
        finally:
            # Whatever happened, the cached base must not keep this adapter's layers.
            base.model = _remove_adapter(peft_model)


PASSAGE_KEYS = ("text", "score", "source", "chunk_id", "metadata")
PROVENANCE_KEYS = ("etag", "start", "end")  # shown when the store reports them


def _passage(found: dict[str, Any]) -> dict[str, Any]:
    """A retrieved passage as the result shows it (JSON-safe)."""
    passage = {key: found.get(key) for key in PASSAGE_KEYS}
    passage.update({key: found[key] for key in PROVENANCE_KEYS if key in found})
    if passage["score"] is not None:
        passage["score"] = round(float(passage["score"]), 6)
    return passage


def _with_version(record: JobRecord, version: int) -> JobRecord:
    record.adapter_version = version
    return record


def _with_result(record: JobRecord, result: dict[str, Any]) -> JobRecord:
    record.result = result
    return record
