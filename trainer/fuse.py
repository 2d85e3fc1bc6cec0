"""Fuse (merge) jobs: an adapter version merged into its base model, stored as a plain model.

    versions/{n}/ downloaded (sha256 checked) -> a fresh 16-bit base (bfloat16, never the
    worker's cached, possibly 4-bit, base) -> PeftModel.from_pretrained -> merge_and_unload ->
    save_pretrained (safetensors) + the base's tokenizer -> merged/{n}/ (manifest.json last)

The merged model loads with `AutoModelForCausalLM.from_pretrained(dir)` alone and gives the
logits of base + adapter within bf16 rounding. `FuseWork` is the `JobWork` the runner runs for a
`FuseRequest`: claim, lease, heartbeat, cancel, SIGTERM, retries, the final record and events
are the runner's, as for training jobs. The record's `adapter_version` is the version merged.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch

from contracts.adapters import MergedManifest
from contracts.jobs import JobProgress, JobRecord
from contracts.keys import ADAPTER_FILES, merged_version_prefix
from trainer.artifacts import sha256_file
from trainer.base_model import BaseModelCache
from trainer.errors import JobFailure
from trainer.job_runner import Delivery, JobRunner, Outcome, is_cuda_oom, report_progress

log = logging.getLogger("avatune.trainer")

FUSE_DTYPE = torch.bfloat16  # merged in 16-bit: merging into 4-bit weights would throw the adapter's precision away
# Progress steps of a fuse job: adapter downloaded, merged and saved locally, uploaded.
FUSE_STEPS = 3


def merge_adapter(
    models: BaseModelCache, base_model: str, adapter_dir: Path, out_dir: Path, dtype: torch.dtype = FUSE_DTYPE
) -> dict[str, Any]:
    """Merge the PEFT adapter in `adapter_dir` into a fresh 16-bit copy of `base_model` and save
    the result (safetensors weights, config, generation config, tokenizer) to `out_dir`.

    The 16-bit base is loaded for this merge only and freed before returning. Returns facts
    for the job's metrics."""
    from peft import PeftModel

    started = time.monotonic()
    held: dict[str, Any] = {}
    try:
        held["base"] = models.load_16bit(base_model, dtype)
        device = str(next(held["base"].parameters()).device)
        held["peft"] = PeftModel.from_pretrained(held["base"], adapter_dir)
        held["merged"] = held["peft"].merge_and_unload()
        load_merge_seconds = time.monotonic() - started
        held["merged"].save_pretrained(out_dir, safe_serialization=True)
    finally:
        held.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    models.stock_tokenizer(base_model).save_pretrained(out_dir)
    weights = sorted(p.name for p in out_dir.iterdir() if p.suffix == ".safetensors")
    pickled = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if not weights or pickled:
        raise RuntimeError(
            f"the merged model was not saved as safetensors only: {sorted(p.name for p in out_dir.iterdir())}"
        )
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "merge_seconds": round(load_merge_seconds, 3),
        "save_seconds": round(time.monotonic() - started - load_merge_seconds, 3),
        "weight_files": weights,
    }


class FuseWork:
    """The `JobWork` of a fuse job (see the module docstring)."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def __call__(self, job: JobRecord, heartbeat: Any, scratch: Path, delivery: Delivery) -> str:
        runner = self.runner
        settings = runner.settings
        user_id, avatar_id = job.user_id, job.avatar_id
        control = runner.control(job, heartbeat)

        def progress(step: int) -> JobProgress:
            return report_progress(control, step, FUSE_STEPS)

        progress(0)
        version = job.adapter_version or self._current_version(user_id, avatar_id)
        if job.adapter_version is None:  # "the current version", resolved now and recorded
            job = runner.jobs.update(user_id, avatar_id, job.id, lambda r: _with_version(r, version))

        done = runner.artifacts.merged_manifest(user_id, avatar_id, version)
        if done is not None and done.job_id == job.id:  # a retry of a job that already uploaded
            log.info("fuse job %s: merged/%d/ already written by this job", job.id, version)
            runner.finish(
                job,
                "succeeded",
                adapter_version=version,
                progress=progress(FUSE_STEPS),
                metrics=_metrics(user_id, avatar_id, done, {}),
            )
            return Outcome.DONE

        adapter_dir = scratch / "adapter"
        meta = runner.artifacts.download_version(user_id, avatar_id, version, adapter_dir)
        if meta is None:
            kept = runner.artifacts.versions(user_id, avatar_id)
            raise JobFailure(
                f"adapter version {version} does not exist for avatar {avatar_id!r} "
                f"(kept versions: {', '.join(map(str, kept)) or 'none'})"
            )
        adapter_hashes = {name: sha256_file(adapter_dir / name) for name in ADAPTER_FILES}
        for name, expected in meta.files.items():
            if name in adapter_hashes and adapter_hashes[name] != expected:
                raise RuntimeError(f"adapter version {version}: {name} does not match its sha256 (retrying)")
        if meta.base_model and meta.base_model != settings.base_model:
            raise JobFailure(
                f"adapter version {version} was trained on {meta.base_model!r}, but this trainer's "
                f"BASE_MODEL is {settings.base_model!r}: an adapter merges only into its own base"
            )
        progress(1)
        if reason := control.stop_reason():
            return runner.stopped(job, reason, delivery)

        out_dir = scratch / "merged"
        try:
            facts = merge_adapter(runner.models, settings.base_model, adapter_dir, out_dir)
        except Exception as exc:
            if is_cuda_oom(exc):
                raise JobFailure(
                    "out of GPU memory while merging: the 16-bit base model does not fit beside "
                    "the worker's cached training base"
                ) from None
            raise
        progress(2)
        if reason := control.stop_reason():
            return runner.stopped(job, reason, delivery)

        started = time.monotonic()
        manifest = runner.artifacts.publish_merged(
            user_id,
            avatar_id,
            out_dir,
            MergedManifest(
                adapter_version=version,
                job_id=job.id,
                base_model=settings.base_model,
                dtype=facts["dtype"],
                adapter_files=adapter_hashes,
            ),
        )
        facts["upload_seconds"] = round(time.monotonic() - started, 3)
        runner.finish(
            job,
            "succeeded",
            adapter_version=version,
            progress=progress(FUSE_STEPS),
            metrics=_metrics(user_id, avatar_id, manifest, facts),
        )
        log.info("fuse job %s: adapter version %d merged into %s", job.id, version, settings.base_model)
        return Outcome.DONE

    def _current_version(self, user_id: str, avatar_id: str) -> int:
        manifest = self.runner.artifacts.current_manifest(user_id, avatar_id)
        if manifest is None:
            raise JobFailure(f"avatar {avatar_id!r} has no trained adapter to merge")
        return manifest.current_version


def _with_version(record: JobRecord, version: int) -> JobRecord:
    record.adapter_version = version
    return record


def _metrics(user_id: str, avatar_id: str, manifest: MergedManifest, facts: dict[str, Any]) -> dict[str, Any]:
    return {
        "merged_prefix": merged_version_prefix(user_id, avatar_id, manifest.adapter_version),
        "merged_version": manifest.adapter_version,
        "base_model": manifest.base_model,
        "dtype": manifest.dtype,
        "files": len(manifest.files),
        **facts,
    }
