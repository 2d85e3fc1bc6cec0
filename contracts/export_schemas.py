"""Write the JSON Schemas of the public message contracts to `schemas/`.

`python -m contracts.export_schemas` (or `make schemas`); a test fails when they are stale.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from contracts.feedback import FeedbackBody, FeedbackItem
from contracts.job_kinds import JOB_KINDS
from contracts.jobs import JobRecord
from contracts.messages import AdapterEvent, JobEvent

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

PUBLIC_MODELS: dict[str, type[BaseModel]] = {
    **{kind.schema_file: kind.request for kind in JOB_KINDS.values()},
    "job-event.v1.json": JobEvent,
    "adapter-event.v1.json": AdapterEvent,
    "job.v1.json": JobRecord,
    # POST {base}/feedback and what it answers (the stored document's line: docs/feedback.md)
    "feedback.v1.json": FeedbackBody,
    "feedback-item.v1.json": FeedbackItem,
}


def render(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n"


def main() -> None:
    SCHEMAS_DIR.mkdir(exist_ok=True)
    for filename, model in PUBLIC_MODELS.items():
        (SCHEMAS_DIR / filename).write_text(render(model))
        print(f"wrote schemas/{filename}")


if __name__ == "__main__":
    main()
