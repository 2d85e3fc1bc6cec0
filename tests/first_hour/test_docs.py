"""The documentation: the site builds strictly (`make docs`: a broken link or anchor, or a page
left out of the nav, fails it), and the README is a landing page a newcomer reads in minutes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_site_builds_with_no_broken_link(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    site = tmp_path / "site"
    # The generated pages: the README as the home page, the API reference from the OpenAPI document.
    assert "Quickstart" in (site / "index.html").read_text()
    reference = (site / "api-reference" / "index.html").read_text()
    assert "POST /v1/users/{user_id}/avatars/{avatar_id}/training-jobs" in reference
    assert "application/problem+json" in reference and (site / "openapi.json").is_file()
    assert "Listing documents by flag" in (site / "benchmark-results" / "index.html").read_text()


def test_the_readme_is_a_landing_page() -> None:
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings == ["Set up", "Quickstart", "Adding a job kind", "Where to go next"]
    setup = README.split("## Set up", 1)[1].split("## Quickstart", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", setup, flags=re.S)[0]
    assert [line.split("#")[0].strip() for line in commands.strip().splitlines()] == ["make dev", "make test"]
    assert len(README.splitlines()) <= 175
    # Every page it sends the reader to exists (the site build checks them again as the home page).
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).is_file(), target
    for page in ("faults.md", "feedback.md", "serving.md", "openai.md", "architecture.md"):
        assert f"(docs/{page})" in README, page


def test_make_docs_builds_the_site_strictly() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = r"^docs: install\n\t(NO_MKDOCS_2_WARNING=1 )?\$\(PY\) -m mkdocs build --strict$"
    assert re.search(recipe, makefile, flags=re.M)


def test_every_test_the_docs_name_exists() -> None:
    """The fault table and the test guide name the tests that hold each promise: a renamed or
    deleted test must not leave the page pointing at nothing."""
    defined = {
        m.group(1)
        for path in (ROOT / "tests").rglob("test_*.py")
        for m in re.finditer(r"^(?:async )?def (test_\w+)", path.read_text(), flags=re.M)
    }
    for page in ("faults.md", "testing.md"):
        text = (ROOT / "docs" / page).read_text()
        named = set(re.findall(r"`(test_\w+)(?:\[[^\]]*\])?`", text))
        assert named or page != "faults.md"
        assert named <= defined, f"{page} names tests that do not exist: {sorted(named - defined)}"
        for path in re.findall(r"`((?:tests/)?[a-z_]+/test_\w+\.py)`", text):
            assert (ROOT / (path if path.startswith("tests/") else f"tests/{path}")).is_file(), path
