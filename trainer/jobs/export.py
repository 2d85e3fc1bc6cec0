"""The `export` job kind: an adapter version written in a serving format.

    the version (the request's; "the current one" resolved now and recorded on the job)
    -> already exported by this job? done (a retry after the upload)
    -> versions/{n}/ downloaded, sha256 checked
    -> gguf: llama.cpp's rules (contracts.serving) checked and adapter.gguf written, with
       `include_base` the base as base.gguf too (`trainer.gguf_export`); peft: the files as they are
    -> exports/{n}/{format}/ uploaded, manifest.json last -> Succeeded

The job's `result` names the prefix and each file's sha256; `GET {base}/exports/{n}/{format}`
hands out presigned URLs. An adapter llama.cpp cannot load fails the job with the rule it breaks.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from contracts.adapters import ExportManifest, VersionMetrics
from contracts.keys import ADAPTER_FILES, export_prefix
from contracts.messages import ExportRequest
from trainer.adapter_files import serving_verdict
from trainer.errors import JobFailure
from trainer.gguf_export import ExportRefused, LlamaShape, adapter_to_gguf, base_to_gguf
from trainer.jobs.adapter_versions import current_version, fetch_version, record_version, version_base
from trainer.runtime.context import JobContext, JobResult, Stopped, Succeeded

log = logging.getLogger("avatune.trainer")

# Progress steps: adapter downloaded, converted, uploaded.
EXPORT_STEPS = 3
ADAPTER_GGUF = "adapter.gguf"
BASE_GGUF = "base.gguf"


class ExportWork:
    """The recipe of `export` jobs (see the module docstring)."""

    def __call__(self, ctx: JobContext) -> JobResult:
        request = ctx.request()
        assert isinstance(request, ExportRequest)
        artifacts = ctx.stores.artifacts
        ctx.progress(0, EXPORT_STEPS)
        version = request.adapter_version or ctx.job.adapter_version
        if version is None:
            version = current_version(ctx, f"avatar {ctx.avatar_id!r} has no trained adapter to export")
            record_version(ctx, version)

        done = artifacts.export_manifest(ctx.user_id, ctx.avatar_id, version, request.format)
        if done is not None and done.job_id == ctx.job.id:
            return self._succeeded(ctx, done)

        adapter_dir, out_dir = ctx.scratch / "adapter", ctx.scratch / "export"
        meta, adapter_hashes = fetch_version(ctx, version, adapter_dir)
        ctx.progress(1, EXPORT_STEPS)
        if reason := ctx.stop_reason():
            return Stopped(reason)

        out_dir.mkdir()
        tied = None
        if request.format == "peft":
            for name in ADAPTER_FILES:
                shutil.copyfile(adapter_dir / name, out_dir / name)
        else:
            base_dir = base_files(ctx, meta, weights=request.include_base)
            tied = _gguf(adapter_dir, base_dir, out_dir, request)
        ctx.progress(2, EXPORT_STEPS)
        if reason := ctx.stop_reason():
            return Stopped(reason)

        manifest = artifacts.publish_export(
            ctx.user_id,
            ctx.avatar_id,
            out_dir,
            ExportManifest(
                adapter_version=version,
                format=request.format,
                job_id=ctx.job.id,
                base_model=meta.base_model,
                outtype=request.outtype if request.format == "gguf" else None,
                include_base=request.include_base,
                adapter_files=adapter_hashes,
                serving=serving_verdict(adapter_dir, tied, ctx.settings.serving_profile().max_lora_rank),
            ),
        )
        log.info("export job %s: version %d written as %s", ctx.job.id, version, request.format)
        return self._succeeded(ctx, manifest)

    @staticmethod
    def _succeeded(ctx: JobContext, manifest: ExportManifest) -> Succeeded:
        prefix = export_prefix(ctx.user_id, ctx.avatar_id, manifest.adapter_version, manifest.format)
        result: dict[str, Any] = {"format": manifest.format, "prefix": prefix, "files": manifest.files}
        return Succeeded(
            metrics={"files": len(manifest.files), "serving": manifest.serving},
            adapter_version=manifest.adapter_version,
            result=result,
            progress=ctx.progress(EXPORT_STEPS, EXPORT_STEPS),
        )


def _gguf(adapter_dir: Path, base_dir: Path, out_dir: Path, request: ExportRequest) -> bool:
    """adapter.gguf (and base.gguf with include_base) in `out_dir`; whether the base ties its
    embeddings. llama.cpp's refusals fail the job with the rule."""
    try:
        adapter_to_gguf(adapter_dir, base_dir, out_dir / ADAPTER_GGUF, request.outtype)
        if request.include_base:
            base_to_gguf(base_dir, out_dir / BASE_GGUF, request.outtype)
        return LlamaShape.of(base_dir).tied_embeddings
    except ExportRefused as exc:
        raise JobFailure(f"cannot export as gguf: {exc}") from None


def base_files(ctx: JobContext, meta: VersionMetrics, *, weights: bool) -> Path:
    """The local directory of the base the version was trained on: its config and tokenizer, and
    its safetensors weights when `weights` (an s3:// base is downloaded as training does; a hub
    base from the hub cache, HF_TOKEN for gated ones)."""
    settings = ctx.settings
    ref = version_base(ctx, meta)
    if Path(ref.path).is_dir():
        return Path(ref.path)
    from huggingface_hub import snapshot_download

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    patterns = ["*.json", "*.safetensors"] if weights else ["config.json"]
    return Path(
        snapshot_download(
            ref.path, revision=ref.revision, cache_dir=settings.model_cache_dir, token=token, allow_patterns=patterns
        )
    )
