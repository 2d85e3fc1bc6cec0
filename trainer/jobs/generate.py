"""The `generate` job kind: try an adapter version (or the base alone) on a prompt.

    the request (GenerateParams) -> the adapter version (the current one when unset, recorded)
    -> its files downloaded, sha256 checked -> [rag: passages from the avatar's vector index,
       put into a system message, `trainer.rag.prompts`] -> the worker's cached base + the
    adapter -> one greedy completion (`trainer.completion`) -> the adapter removed again
    -> Succeeded with the completion as `result`

The cached base is shared with training jobs and kept loaded: the adapter's LoRA layers are
injected for this job only and unloaded afterwards (as training does), so the next job meets
the untouched base. For trying an adapter, not for serving traffic: one request, greedy,
bounded by MAX_GENERATION_TOKENS.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from contracts.adapters import VersionMetrics
from contracts.messages import GenerateRequest
from trainer.adapter_ops import adapter_attached
from trainer.base_model import BaseRef, LoadedBase, QuantOptions
from trainer.completion import Message, PromptTooLong, generate_completion
from trainer.errors import JobFailure, is_cuda_oom
from trainer.jobs.adapter_versions import current_version, fetch_version, record_version, version_base
from trainer.rag.prompts import fit_rag_messages, passage_view, query_of
from trainer.runtime.context import JobContext, JobResult, Stopped, Succeeded

log = logging.getLogger("avatune.trainer")

# Progress steps: request resolved, adapter downloaded, passages retrieved, generated.
GENERATE_STEPS = 4
BASE_ONLY = 0  # adapter_version 0: the base model alone


class GenerateWork:
    """The recipe of `generate` jobs (see the module docstring)."""

    def __call__(self, ctx: JobContext) -> JobResult:
        ctx.progress(0, GENERATE_STEPS)
        params = ctx.request()
        assert isinstance(params, GenerateRequest)
        version = self._version(ctx, params.adapter_version)
        ctx.progress(1, GENERATE_STEPS)

        adapter_dir, meta = self._adapter(ctx, version)
        ref = self._base_ref(ctx, meta)
        ctx.progress(2, GENERATE_STEPS)
        if reason := ctx.stop_reason():
            return Stopped(reason)

        max_new_tokens = min(params.max_new_tokens, ctx.settings.max_generation_tokens)
        messages: list[Message] = params.chat()
        passages: list[dict[str, Any]] | None = None
        if params.rag is not None:
            passages = self._retrieve(ctx, messages, params.rag.top_k, params.rag.score_threshold)
        ctx.progress(3, GENERATE_STEPS)
        if reason := ctx.stop_reason():
            return Stopped(reason)

        loads_before = ctx.stores.models.loads
        base = self._cached_base(ctx, ref, meta)
        if passages is not None:
            window = getattr(base.model.config, "max_position_embeddings", None)
            max_prompt = None if window is None else window - max_new_tokens
            messages, passages = fit_rag_messages(base.tokenizer, messages, passages, max_prompt)
        text, facts = self._generate(base, adapter_dir, messages, max_new_tokens)

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
            "base_model_reused": ctx.stores.models.loads == loads_before,
        }
        log.info("generate job %s: %d tokens with adapter version %d", ctx.job.id, facts["completion_tokens"], version)
        progress = ctx.progress(GENERATE_STEPS, GENERATE_STEPS)
        return Succeeded(metrics=metrics, adapter_version=version, result=result, progress=progress)

    @staticmethod
    def _version(ctx: JobContext, asked: int | None) -> int:
        """The version to try: the one asked for, else the current one (recorded on the job)."""
        version = asked
        if version is None:
            version = current_version(
                ctx,
                f"avatar {ctx.avatar_id!r} has no trained adapter; train one first, or ask for "
                "adapter_version 0 to try the base model alone",
            )
        if ctx.job.adapter_version != version:
            record_version(ctx, version)
        return version

    @staticmethod
    def _adapter(ctx: JobContext, version: int) -> tuple[Path | None, VersionMetrics | None]:
        """The version's files, downloaded and checked, and its metrics; (None, None) for the base alone."""
        if version == BASE_ONLY:
            return None, None
        adapter_dir = ctx.scratch / "adapter"
        meta, _ = fetch_version(ctx, version, adapter_dir)
        if meta.metrics.get("method") == "full":
            raise JobFailure(f"version {version} is a fully fine-tuned model, not an adapter")
        return adapter_dir, meta

    @staticmethod
    def _base_ref(ctx: JobContext, meta: VersionMetrics | None) -> BaseRef:
        """The base to generate on: the one the adapter version was trained on, or BASE_MODEL
        for the base alone."""
        return version_base(ctx, meta)

    @staticmethod
    def _cached_base(ctx: JobContext, ref: BaseRef, meta: VersionMetrics | None) -> LoadedBase:
        """The worker's cached base, asked for as training asks for it (same method and 4-bit
        options), so the base a training job left loaded is reused rather than loaded again."""
        settings = ctx.settings
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
        return ctx.stores.models.get(ref.path, method, quant, revision=ref.revision, token=ref.token)

    @staticmethod
    def _retrieve(
        ctx: JobContext, messages: list[Message], top_k: int, score_threshold: float | None
    ) -> list[dict[str, Any]]:
        """The passages for the conversation's last user message, best first."""
        try:
            query = query_of(messages)
        except ValueError as exc:
            raise JobFailure(str(exc)) from None
        from trainer.rag.search import search  # lazily: its embedding model loads only for RAG jobs

        found = search(ctx.settings, ctx.user_id, ctx.avatar_id, query, top_k, score_threshold, {})
        return [passage_view(p) for p in found]

    @staticmethod
    def _generate(base: LoadedBase, adapter_dir: Path | None, messages: list[Message], max_new_tokens: int) -> Any:
        """One greedy completion on the base, with the adapter attached for it when there is one."""
        try:
            if adapter_dir is None:
                return generate_completion(base.model, base.tokenizer, messages, max_new_tokens)
            # Whatever happens, the cached base must not keep this adapter's layers.
            with adapter_attached(base, adapter_dir) as model:
                return generate_completion(model, base.tokenizer, messages, max_new_tokens)
        except PromptTooLong as exc:
            raise JobFailure(str(exc)) from None
        except Exception as exc:
            if is_cuda_oom(exc):
                raise JobFailure("out of GPU memory while generating: lower max_new_tokens or the prompt") from None
            raise
