"""Data-parallel jobs: one job on several GPUs (or CPU processes) of one machine.

The worker keeps owning the job (message, heartbeat, lease, status); it launches the training
itself as `torchrun --nproc_per_node N -m trainer.distributed <spec.json>` and talks to the
ranks through files in the job's scratch directory:

- `spec.json`      what to train (config, base model, tokenized examples, resume checkpoint)
- `progress.json`  written by rank 0 after each step; the heartbeat persists it
- `stop`           written by the worker to stop training (its content is the reason)
- `checkpoints/`   rank 0 reports each saved checkpoint through `checkpoint.json`
- `result.json`    written by rank 0 at the end (metrics, adapter directory)

Every rank reads the stop file, but the decision to stop or checkpoint is all-reduced across
ranks each step (see trainer.training), so no rank waits forever in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from contracts.adapter import AdapterSettings
from contracts.jobs import JobProgress
from contracts.metrics import TrainingMetrics
from trainer.checkpoint_schedule import CheckpointSchedule
from trainer.control import TrainingControl
from trainer.dataset import TokenizedExample
from trainer.training import TrainOutcome

log = logging.getLogger("avatune.trainer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: a reader never sees half a file


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def available_devices() -> int:
    """GPUs on this machine; on a CPU-only machine, its cores (gloo processes, for testing)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


def run_data_parallel(
    *,
    processes: int,
    base_model: str,
    method: str,
    cfg: AdapterSettings,
    train_examples: list[TokenizedExample],
    eval_examples: list[TokenizedExample],
    work_dir: Path,
    control: TrainingControl,
    resume_from: Path | None,
    env: dict[str, str] | None = None,
    revision: str | None = None,
    token_env: str | None = None,
    report_to: list[str] | None = None,
    log_dir: Path | None = None,
) -> TrainOutcome:
    """Train on `processes` ranks; returns when they have finished or stopped."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "base_model": base_model,
        "method": method,
        "config": cfg.model_dump(),
        "train": [asdict(e) for e in train_examples],
        "eval": [asdict(e) for e in eval_examples],
        "work_dir": str(work_dir),
        "resume_from": str(resume_from) if resume_from else None,
        # The hub token stays in the environment the ranks inherit: only its variable's name is written.
        "revision": revision,
        "token_env": token_env,
        "report_to": list(report_to or []),
        "log_dir": str(log_dir) if log_dir else None,
    }
    _write_json(work_dir / "spec.json", spec)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "trainer.distributed",
        str(work_dir / "spec.json"),
    ]
    proc = subprocess.Popen(command, env=dict(os.environ, **(env or {})))
    reported_checkpoint: int | None = None
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            progress = _read_json(work_dir / "progress.json")
            if progress:
                control.report(JobProgress(**progress))
            reason = control.stop_reason()
            if reason and not (work_dir / "stop").exists():
                (work_dir / "stop").write_text(reason)
            checkpoint = _read_json(work_dir / "checkpoint.json")
            if checkpoint and checkpoint["step"] != reported_checkpoint:
                reported_checkpoint = checkpoint["step"]
                control.checkpoint_saved(Path(checkpoint["dir"]), checkpoint["step"])
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    result = _read_json(work_dir / "result.json")
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"data-parallel training exited with {proc.returncode}")
    return TrainOutcome(
        completed=result["completed"],
        stop_reason=result.get("stop_reason"),
        adapter_dir=Path(result["adapter_dir"]) if result.get("adapter_dir") else None,
        metrics=TrainingMetrics.model_validate(result.get("metrics", {})),
    )


class _FileControl:
    """A rank's view of the job: the worker's stop file, progress and checkpoints via files."""

    def __init__(self, work_dir: Path, rank: int, schedule: CheckpointSchedule) -> None:
        self._dir = work_dir
        self._rank = rank
        self._schedule = schedule

    def stop_reason(self) -> str | None:
        stop = self._dir / "stop"
        return stop.read_text() or "stopped" if stop.exists() else None

    def report(self, progress: JobProgress) -> None:
        if self._rank == 0:
            _write_json(self._dir / "progress.json", progress.model_dump())

    def checkpoint_due(self, step: int) -> bool:
        return self._schedule.due(step)

    def checkpoint_saved(self, local_dir: Path, step: int) -> None:
        self._schedule.saved()
        if self._rank == 0:
            _write_json(self._dir / "checkpoint.json", {"step": step, "dir": str(local_dir)})


def _rank_main(spec_path: str) -> None:
    import torch.distributed as dist

    from trainer.base_model import BaseModelCache, QuantOptions
    from trainer.library_warnings import quiet_known_warnings
    from trainer.settings import get_settings
    from trainer.training import train_adapter

    quiet_known_warnings()
    spec = json.loads(Path(spec_path).read_text())
    work_dir = Path(spec["work_dir"])
    rank = int(os.environ.get("RANK", "0"))
    settings = get_settings()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    if spec.get("token_env"):
        token = os.environ.get(spec["token_env"]) or token
    cfg = AdapterSettings.model_validate(spec["config"])
    quant = QuantOptions(
        cfg.quant_type or "nf4", True if cfg.double_quant is None else cfg.double_quant, cfg.compute_dtype
    )
    base = BaseModelCache(settings.model_cache_dir, token).get(
        spec["base_model"], spec["method"], quant, revision=spec.get("revision")
    )
    schedule = CheckpointSchedule(settings.checkpoint_every_steps, settings.checkpoint_interval_seconds)
    control = _FileControl(work_dir, rank, schedule)
    outcome = train_adapter(
        base,
        cfg,
        [TokenizedExample(**e) for e in spec["train"]],
        [TokenizedExample(**e) for e in spec["eval"]],
        work_dir / f"rank-{rank}" if rank else work_dir,
        control,
        Path(spec["resume_from"]) if spec["resume_from"] else None,
        # Only rank 0 logs: the other ranks would write duplicate event files.
        report_to=spec.get("report_to") if rank == 0 else None,
        log_dir=Path(spec["log_dir"]) if spec.get("log_dir") else None,
    )
    if rank == 0:
        metrics = outcome.metrics.with_values(world_size=int(os.environ.get("WORLD_SIZE", "1"))).as_dict()
        _write_json(
            work_dir / "result.json",
            {
                "completed": outcome.completed,
                "stop_reason": outcome.stop_reason,
                "adapter_dir": str(outcome.adapter_dir) if outcome.adapter_dir else None,
                "metrics": metrics,
            },
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
