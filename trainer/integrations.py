"""`integrations.report_to`: the training loggers a job asks for, writing into a local log
directory that is uploaded to the job's `log_uri` when training ends (finished or stopped).

- `tensorboard`: transformers' TensorBoardCallback with a SummaryWriter on the log directory.
- `wandb` / `mlflow`: only when the package is installed on the worker, and always offline
  into the log directory (the worker reaches no tracking server; the files go to S3 instead).
  A job asking for one the worker lacks fails clearly before training.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from contracts.s3uri import S3Uri
from trainer.errors import JobFailure

log = logging.getLogger("avatune.trainer")

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_available(report_to: list[str]) -> None:
    """Fail the job before any work when a requested integration's package is missing."""
    for name in report_to:
        package = _PACKAGES.get(name)
        if package is None:
            raise JobFailure(f"report_to {name!r} is not supported (tensorboard, wandb, mlflow)")
        if importlib.util.find_spec(package) is None:
            raise JobFailure(f"report_to {name} needs the {package} package on the worker")


def callbacks(report_to: list[str], log_dir: Path) -> list[TrainerCallback]:
    """Trainer callbacks logging into `log_dir` (created)."""
    check_available(report_to)
    log_dir.mkdir(parents=True, exist_ok=True)
    found: list[TrainerCallback] = []
    for name in dict.fromkeys(report_to):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            found.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir / "tensorboard"))))
        elif name == "wandb":
            from transformers.integrations import WandbCallback

            # Offline: runs are written under WANDB_DIR and synced by whoever downloads them.
            os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(log_dir), WANDB_SILENT="true")
            found.append(WandbCallback())
        elif name == "mlflow":
            from transformers.integrations import MLflowCallback

            os.environ["MLFLOW_TRACKING_URI"] = (log_dir / "mlruns").as_uri()
            found.append(MLflowCallback())
    return found


def upload_logs(s3: Any, log_dir: Path, dest: S3Uri) -> int:
    """Upload every file under `log_dir` below the `dest` prefix; the number of files."""
    count = 0
    if not log_dir.is_dir():
        return 0
    for path in sorted(p for p in log_dir.rglob("*") if p.is_file()):
        s3.upload_file(str(path), dest.bucket, dest.child(path.relative_to(log_dir).as_posix()).key)
        count += 1
    log.info("uploaded %d log files to %s", count, dest)
    return count
