"""Print the requirements of one Lambda bundle, read from pyproject.toml (one source of truth).

    python infra/aws/lambda_requirements.py api      # core + the `api` extra, minus the local server
    python infra/aws/lambda_requirements.py events   # core only (pydantic): the events handler

Used by infra/aws/Makefile (`sam build`). uvicorn is left out of the API bundle: on Lambda,
Mangum is the server.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Needed to run a server locally, never on Lambda.
LAMBDA_EXCLUDED = {"uvicorn"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower()


def requirements(bundle: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    if bundle == "api":
        reqs += project["optional-dependencies"]["api"]
    elif bundle != "events":
        raise SystemExit(f"unknown bundle {bundle!r}: api or events")
    return [r for r in reqs if _name(r) not in LAMBDA_EXCLUDED]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print("\n".join(requirements(sys.argv[1])))
