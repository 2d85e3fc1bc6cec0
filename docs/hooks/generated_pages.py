"""MkDocs hook (`mkdocs.yml`, `hooks:`): the pages made at build time, so none can go stale.

- `index.md`: the README, whose links to `docs/…` pages and `BENCHMARKS.md` are rewritten to
  the site's pages (the README stays the one landing page, on GitHub and here);
- `api-reference.md`: every route, parameter, body, answer and schema of the API, rendered from
  the app's own OpenAPI document (`handlers.app`, read in a subprocess so the app's logging
  setup stays out of MkDocs), and `openapi.json` beside it;
- `benchmark-results.md`: `BENCHMARKS.md` as `make bench` last wrote it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

HTTP_METHODS = ("get", "put", "post", "patch", "delete")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = Path(config.config_file_path).parent
    spec = openapi_document(root)
    files.append(File.generated(config, "index.md", content=home_page((root / "README.md").read_text())))
    files.append(File.generated(config, "api-reference.md", content=api_reference(spec)))
    files.append(File.generated(config, "openapi.json", content=json.dumps(spec, indent=2)))
    files.append(File.generated(config, "benchmark-results.md", content=(root / "BENCHMARKS.md").read_text()))
    return files


# -- the home page -------------------------------------------------------------------------------


def home_page(readme: str) -> str:
    """The README with its repository-relative links made site-relative."""
    readme = readme.replace("](docs/", "](").replace("](BENCHMARKS.md", "](benchmark-results.md")
    return re.sub(r"\]\((?!https?://|#)([^)]*)\)", _check_link, readme)


def _check_link(match: re.Match[str]) -> str:
    target = match.group(1)
    if "/" in target.split("#")[0]:
        raise ValueError(f"README links to {target!r}, which is neither a docs/ page nor BENCHMARKS.md")
    return match.group(0)


# -- the API reference ---------------------------------------------------------------------------


def openapi_document(root: Path) -> dict[str, Any]:
    """The app's OpenAPI document, from a fresh interpreter (the app reads its settings and sets
    up logging when imported)."""
    env = {**os.environ, "DEV_MODE": "true", "LOG_FORMAT": "text", "PYTHONPATH": str(root)}
    code = "import json; from handlers.app import app; print(json.dumps(app.openapi()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"could not read the app's OpenAPI document: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def type_of(schema: dict[str, Any]) -> str:
    """A schema as a short type, linking the named ones to their section below."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(type_of(s) for s in schema[key])
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type")
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {type_of(schema['additionalProperties'])}"
    if kind is None:
        return "any"
    return f"{kind} ({schema['format']})" if "format" in schema else str(kind)


def _constraints(schema: dict[str, Any]) -> str:
    keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "maxItems")
    found = [f"{k} {schema[k]}" for k in keys if k in schema]
    if "pattern" in schema:  # as HTML entities: Markdown would split the cell at `|` and read `*`, `_`, `\`
        pattern = "".join(c if c.isalnum() else f"&#{ord(c)};" for c in schema["pattern"])
        found.append(f"pattern <code>{pattern}</code>")
    return f" ({', '.join(found)})" if found else ""


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    out = [f"### `{method.upper()} {path}`", "", f"**{op.get('summary', '')}**", ""]
    if op.get("description"):
        out += [op["description"], ""]
    if op.get("security"):
        out += ["Needs a bearer token.", ""]
    if op.get("parameters"):
        out += ["| parameter | in | type | required | description |", "| --- | --- | --- | --- | --- |"]
        for p in op["parameters"]:
            schema = p.get("schema", {})
            kind = type_of(schema) + _constraints(schema)
            required = "yes" if p.get("required") else "no"
            out.append(f"| `{p['name']}` | {p['in']} | {kind} | {required} | {_cell(p.get('description'))} |")
        out.append("")
    body = op.get("requestBody")
    if body:
        kinds = ", ".join(f"`{media}`: {type_of(c.get('schema', {}))}" for media, c in body["content"].items())
        required = "required" if body.get("required") else "optional"
        out += [f"Request body ({required}): {kinds}. {_cell(body.get('description'))}", ""]
    out += ["| status | answer | what |", "| --- | --- | --- |"]
    for status, response in sorted(op.get("responses", {}).items()):
        content = response.get("content") or {}
        answer = ", ".join(f"`{media}` {type_of(c.get('schema', {}))}" for media, c in content.items()) or "no body"
        out.append(f"| {status} | {answer} | {_cell(response.get('description'))} |")
    return [*out, ""]


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    if schema.get("description"):
        out += [" ".join(schema["description"].split()), ""]
    properties = schema.get("properties") or {}
    if properties:
        required = set(schema.get("required", []))
        out += ["| field | type | required | description |", "| --- | --- | --- | --- |"]
        for field, prop in properties.items():
            kind = type_of(prop) + _constraints(prop)
            out.append(
                f"| `{field}` | {kind} | {'yes' if field in required else 'no'} | {_cell(prop.get('description'))} |"
            )
        out.append("")
    if schema.get("additionalProperties") is True:
        out += ["Other fields may appear (kept as they are).", ""]
    if not properties and "enum" in schema:
        out += [f"One of {type_of(schema)}.", ""]
    return out


def api_reference(spec: dict[str, Any]) -> str:
    info = spec["info"]
    out = [
        "# API reference",
        "",
        f"{info['title']} API, version {info['version']}: generated from the app's OpenAPI document when this "
        "site was built. The running API serves the same document at `/openapi.json` and Swagger UI at `/docs` "
        "(press **Authorize**, paste a token, and try any route); this site's copy: [openapi.json](openapi.json). "
        "How to use it: [Using the API](api.md).",
        "",
        info.get("description", ""),
        "",
    ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method in HTTP_METHODS:
                by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((method, path, op))
    for tag, ops in by_tag.items():
        out += [f"## {tag.capitalize()}", ""]
        for method, path, op in ops:
            out += _operation(method, path, op)
    out += ["## Schemas", ""]
    for name, schema in sorted(spec.get("components", {}).get("schemas", {}).items()):
        out += _schema(name, schema)
    return "\n".join(out) + "\n"
