"""`avatune generate`: try an adapter version (or the base alone) on a prompt.

Queues a generation job (POST {base}/generations), follows it and prints the completion on
stdout (the rest — job id, token counts, passages — goes to stderr, so the completion pipes).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Annotated, Any

import typer
from rich.text import Text

from cli.client import ApiError
from cli.commands.jobs import POLL_SECONDS, follow_job
from cli.context import CliError, print_json, state


def _body(
    prompt: str, version: int | None, max_new_tokens: int | None, top_k: int | None, score_threshold: float | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt}
    if version is not None:
        body["adapter_version"] = version
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    if top_k is not None or score_threshold is not None:
        rag: dict[str, Any] = {"top_k": top_k} if top_k is not None else {}
        if score_threshold is not None:
            rag["score_threshold"] = score_threshold
        body["rag"] = rag
    return body


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="the user message; '-' reads it from stdin")],
    version: Annotated[
        int | None,
        typer.Option(  # noqa: UP007
            "--version", min=0, help="the adapter version; 0: the base model alone; default: current"
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(  # noqa: UP007
            "--max-new-tokens", min=1, help="at most this many new tokens (server default 128)"
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(  # noqa: UP007
            "--rag-top-k", min=1, help="retrieve this many passages from the avatar's index into the prompt"
        ),
    ] = None,
    score_threshold: Annotated[
        float | None,
        typer.Option(  # noqa: UP007
            "--rag-score-threshold", help="with RAG: only passages at least this similar"
        ),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="queue the job and print its id only")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(  # noqa: UP007
            "--timeout", min=0, metavar="SECONDS", help="stop waiting after this long (exit 1; the job goes on)"
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, hidden=True, help="seconds between polls")
    ] = POLL_SECONDS,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the generation job's JSON (its `result`) instead of the completion")
    ] = False,
) -> None:
    """Try an adapter on a prompt (POST {base}/generations): prints the completion."""
    st = state(ctx)
    client = st.client()
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CliError("the prompt is empty")
    try:
        job = client.create_generation(_body(prompt, version, max_new_tokens, top_k, score_threshold))
    except ApiError as exc:
        if exc.is_missing_route:
            raise CliError(
                f"generations are not supported by this server ({client.api_url} has no "
                f"POST .../generations route; answered {exc.status})"
            ) from None
        raise
    if no_wait:
        if as_json:
            print_json(job)
        else:
            typer.echo(job["id"])
        return
    st.err.print(Text(f"generation job {job['id']}: {job['status']}"))
    # The progress display goes to stderr with the rest; stdout carries the completion only.
    done = follow_job(replace(st, out=st.err), client, job, interval, timeout)
    if done["status"] != "succeeded":
        raise CliError(
            f"generation job {done['id']} {done['status']}" + (f": {done['error']}" if done.get("error") else "")
        )
    if as_json:
        print_json(done)
        return
    result = done.get("result") or {}
    for number, passage in enumerate(result.get("passages") or [], start=1):
        st.err.print(Text(f"[{number}] {passage.get('source')} (score {passage.get('score')})"))
    st.err.print(
        Text(
            f"adapter version {result.get('adapter_version')}, {result.get('prompt_tokens')} prompt + "
            f"{result.get('completion_tokens')} completion tokens ({result.get('finish_reason')})"
        )
    )
    typer.echo(result.get("completion", ""))
