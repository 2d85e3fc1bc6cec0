"""`avatune train` and `avatune jobs ...`: jobs of every kind, followed live (`follow`, with a
progress bar) or waited for (`wait`, quiet: for scripts and the Quickstart)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text

from cli.client import ApiError, ApiUnreachable, AvatuneClient
from cli.context import (
    CliError,
    JsonOutput,
    State,
    add_id_column,
    fmt_value,
    human_duration,
    human_time,
    kv_table,
    list_table,
    parse_settings,
    print_json,
    short_time,
    state,
    styled_status,
)

app = typer.Typer(help="Training jobs.", no_args_is_help=True)


class Objective(StrEnum):
    """What `avatune train` learns from (the job spec's `objective`)."""

    sft = "sft"
    dpo = "dpo"
    kto = "kto"


FINAL = frozenset({"succeeded", "failed", "cancelled"})
POLL_SECONDS = 1.0
TIMEOUT = typer.Option(
    "--timeout",
    min=0,
    metavar="SECONDS",
    help="with --follow: stop following after this long (exit 1; the job goes on)",
)
# Consecutive failed polls (API unreachable or 5xx) tolerated while following a job.
MAX_POLL_FAILURES = 10


def _loss(progress: dict[str, Any]) -> str:
    loss = progress.get("train_loss")
    return f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"


def _describe(job: dict[str, Any]) -> str:
    status = job["status"]
    if status == "running":
        epoch = (job.get("progress") or {}).get("epoch")
        if job.get("cancel_requested"):
            return "cancelling"
        return f"running, epoch {epoch:.2f}" if isinstance(epoch, (int, float)) and epoch else "running"
    return status


def poll_job(
    client: AvatuneClient,
    job: dict[str, Any],
    interval: float = POLL_SECONDS,
    timeout: float | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    command: str = "wait",
) -> dict[str, Any]:
    """Poll the job until it ends; the final job. Passing trouble (API unreachable, 5xx, 429)
    is retried up to MAX_POLL_FAILURES times in a row. After `timeout` seconds: CliError (the
    job goes on; the message names `avatune jobs <command>` to pick it up again)."""
    job_id = job["id"]
    deadline = None if timeout is None else time.monotonic() + timeout
    failures = 0
    while job["status"] not in FINAL:
        if deadline is not None and time.monotonic() >= deadline:
            raise CliError(
                f"job {job_id} is still {job['status']} after {timeout:g} s; stopped "
                f"{'following' if command == 'follow' else 'waiting'} (it goes on: `avatune jobs {command} {job_id}`)"
            )
        time.sleep(interval)
        try:
            job = client.get_job(job_id)
            failures = 0
        except (ApiUnreachable, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status < 500 and exc.status != 429:
                raise
            failures += 1
            if failures >= MAX_POLL_FAILURES:
                raise
            continue
        if on_update is not None:
            on_update(job)
    return job


def _stopped_following(st: State, job_id: str) -> typer.Exit:
    st.err.print(
        Text(f"stopped following job {job_id}; it goes on (`avatune jobs cancel {job_id}` stops it)", style="yellow")
    )
    return typer.Exit(130)


def follow_job(
    st: State, client: AvatuneClient, job: dict[str, Any], interval: float = POLL_SECONDS, timeout: float | None = None
) -> dict[str, Any]:
    """Poll the job until it ends, with a live progress bar on `st.out`; the final job. After
    `timeout` seconds: CliError (the job goes on)."""
    job_id = job["id"]
    columns = (
        SpinnerColumn(finished_text="•"),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eta {task.fields[eta]}"),
    )
    try:
        with Progress(*columns, console=st.out) as bar:
            progress = job.get("progress") or {}
            task = bar.add_task(
                _describe(job),
                total=progress.get("total_steps"),
                completed=progress.get("step", 0),
                loss=_loss(progress),
                eta=human_duration(progress.get("eta_seconds")),
            )
            last_status = [job["status"]]

            def update(current: dict[str, Any]) -> None:
                if current["status"] != last_status[0]:
                    bar.console.print(Text.assemble(f"job {job_id}: ", styled_status(current["status"])))
                    last_status[0] = current["status"]
                progress = current.get("progress") or {}
                total = progress.get("total_steps")
                step = total if current["status"] == "succeeded" and total else progress.get("step", 0)
                bar.update(
                    task,
                    description=_describe(current),
                    total=total,
                    completed=step,
                    loss=_loss(progress),
                    eta=human_duration(0 if current["status"] in FINAL else progress.get("eta_seconds")),
                )

            return poll_job(client, job, interval, timeout, update, command="follow")
    except KeyboardInterrupt:
        raise _stopped_following(st, job_id) from None


def _outcome_line(job: dict[str, Any]) -> Text:
    line = Text.assemble(f"{job.get('type', 'train')} job {job['id']} ", styled_status(job["status"]))
    if job["status"] == "succeeded" and job.get("adapter_version") is not None:
        line.append(f": adapter version {job['adapter_version']}")
    if job.get("error"):
        line.append(f": {job['error']}")
    return line


def print_outcome(st: State, job: dict[str, Any], *, metrics: bool = True) -> int:
    """The end of a followed job; the exit code (0 only when it succeeded)."""
    status = job["status"]
    if status == "succeeded":
        st.out.print(_outcome_line(job))
        if metrics and job.get("metrics"):
            st.out.print(kv_table(job["metrics"], title="metrics"))
        return 0
    st.err.print(_outcome_line(job))
    return 1


def job_rows(job: dict[str, Any]) -> dict[str, Any]:
    progress = job.get("progress") or {}
    total = progress.get("total_steps")
    return {
        "id": job["id"],
        "status": styled_status(job["status"]),
        "avatar": job.get("avatar_id"),
        "created": human_time(job.get("created_at")),
        "started": human_time(job.get("started_at")),
        "finished": human_time(job.get("finished_at")),
        "progress": f"{progress.get('step', 0)}/{total if total is not None else '?'}"
        f" (epoch {fmt_value(progress.get('epoch'))}, loss {_loss(progress)},"
        f" eta {human_duration(progress.get('eta_seconds'))})",
        "overrides": ", ".join(f"{k}={fmt_value(v)}" for k, v in (job.get("config") or {}).items()) or "-",
        "adapter version": job.get("adapter_version"),
        "documents": ", ".join(d["name"] for d in job.get("data") or []) or "-",
        "cancel requested": job.get("cancel_requested"),
        "attempts": job.get("attempts"),
        "error": job.get("error"),
    }


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    all_avatars: Annotated[bool, typer.Option("--all-avatars", help="the user's jobs across every avatar")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="show at most this many (newest first)")] = 20,
    as_json: JsonOutput = False,
) -> None:
    """List jobs, newest first."""
    st = state(ctx)
    client = st.client(avatar=not all_avatars)
    jobs = []
    for job in client.iter_jobs(all_avatars=all_avatars, page_size=min(limit, 100)):
        jobs.append(job)
        if len(jobs) >= limit:
            break
    if as_json:
        print_json(jobs)
        return
    if not jobs:
        st.out.print("no jobs")
        return
    table = list_table("jobs of " + (f"user {client.user_id}" if all_avatars else f"{st.avatar}"))
    add_id_column(table, "id", (job["id"] for job in jobs))
    if all_avatars:
        add_id_column(table, "avatar", (job.get("avatar_id") for job in jobs))
    for col in ("type", "status", "created", "loss", "ver"):
        table.add_column(col, justify="right" if col in ("loss", "ver") else "left", no_wrap=col in ("loss", "ver"))
    for job in jobs:
        cells: list[Any] = [Text(job["id"])]
        if all_avatars:
            cells.append(Text(job.get("avatar_id") or "-"))
        cells += [
            job.get("type") or "-",
            styled_status(job["status"]),
            short_time(job.get("created_at")),
            _loss(job.get("progress") or {}),
            fmt_value(job.get("adapter_version")),
        ]
        table.add_row(*cells)
    st.out.print(table)


@app.command("show")
def show(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOutput = False) -> None:
    """Show one job."""
    st = state(ctx)
    job = st.client().get_job(job_id)
    if as_json:
        print_json(job)
        return
    st.out.print(kv_table(job_rows(job)))
    if job.get("metrics"):
        st.out.print(kv_table(job["metrics"], title="metrics"))


@app.command("follow")
def follow(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    timeout: Annotated[float | None, TIMEOUT] = None,  # noqa: UP007
    interval: Annotated[float, typer.Option("--interval", min=0.05, hidden=True)] = POLL_SECONDS,
    as_json: JsonOutput = False,
) -> None:
    """Follow a job until it ends, with a progress bar (exit code 0 only when it succeeded)."""
    st = state(ctx)
    client = st.client()
    shown = replace(st, out=st.err) if as_json else st  # with --json, stdout carries the JSON alone
    job = follow_job(shown, client, client.get_job(job_id), interval, timeout)
    if as_json:
        print_json(job)
    raise typer.Exit(print_outcome(shown, job, metrics=not as_json))


@app.command("wait")
def wait(
    ctx: typer.Context,
    job_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="one or more job ids")],
    timeout: Annotated[
        float | None,  # noqa: UP007
        typer.Option("--timeout", min=0, metavar="SECONDS", help="stop waiting after this long (exit 1; jobs go on)"),
    ] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.05, hidden=True)] = POLL_SECONDS,
    as_json: JsonOutput = False,
) -> None:
    """Wait until jobs end, quietly (for scripts): one line per job, or its JSON with --json;
    exit code 0 only when every one succeeded."""
    st = state(ctx)
    client = st.client()
    deadline = None if timeout is None else time.monotonic() + timeout
    failed = 0
    try:
        for job_id in job_ids:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            job = poll_job(client, client.get_job(job_id), interval, left)
            if as_json:
                print_json(job)
            if job["status"] == "succeeded":
                (st.err if as_json else st.out).print(_outcome_line(job))
            else:
                failed += 1
                st.err.print(_outcome_line(job))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(1 if failed else 0)


@app.command("cancel")
def cancel(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOutput = False
) -> None:
    """Cancel a job (queued: at once; running: at the trainer's next step)."""
    st = state(ctx)
    job = st.client().cancel_job(job_id)
    if as_json:
        print_json(job)
    elif job["status"] == "cancelled":
        st.out.print(Text.assemble(f"job {job['id']} ", styled_status("cancelled")))
    else:
        st.out.print(Text(f"job {job['id']} is {job['status']}: cancel requested, the trainer stops at its next step"))


def train(
    ctx: typer.Context,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="show live progress until the job ends")] = False,
    epochs: Annotated[float | None, typer.Option("--epochs", help="num_epochs for this job")] = None,  # noqa: UP007
    lr: Annotated[float | None, typer.Option("--lr", help="learning_rate for this job")] = None,  # noqa: UP007
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank for this job")] = None,  # noqa: UP007
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="batch_size for this job")] = None,  # noqa: UP007
    set_: Annotated[
        list[str] | None,
        typer.Option(  # noqa: UP007
            "--set", metavar="KEY=VALUE", help="any other adapter setting for this job (VALUE as JSON); repeatable"
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(  # noqa: UP007
            "--idempotency-key", help="a retry with the same key answers the same job"
        ),
    ] = None,
    objective: Annotated[
        Objective,
        typer.Option(
            "--objective",
            help="sft: learn from the documents (demonstrations); dpo: from feedback pairs; kto: from rated "
            "replies. dpo and kto continue the current adapter",
        ),
    ] = Objective.sft,
    beta: Annotated[
        float | None,
        typer.Option(  # noqa: UP007
            "--beta", min=0, help="dpo/kto: how close to stay to the current adapter (default 0.1)"
        ),
    ] = None,
    timeout: Annotated[float | None, TIMEOUT] = None,  # noqa: UP007
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, hidden=True, help="seconds between polls")
    ] = POLL_SECONDS,
    as_json: JsonOutput = False,
) -> None:
    """Queue a training job on the documents flagged for training (--objective dpo|kto: on the feedback)."""
    st = state(ctx)
    client = st.client()
    overrides = {
        **parse_settings(set_),
        **{
            k: v
            for k, v in {"num_epochs": epochs, "learning_rate": lr, "r": r, "batch_size": batch_size}.items()
            if v is not None
        },
    }
    if objective is not Objective.sft:
        overrides["objective"] = objective.value
    if beta is not None:
        if objective is Objective.sft:
            raise CliError("--beta is a dpo/kto setting: add --objective dpo or kto")
        overrides["preference"] = {**overrides.get("preference", {}), "beta": beta}
    job = client.create_job(overrides, idempotency_key=idempotency_key)
    shown = replace(st, out=st.err) if as_json else st  # with --json, stdout carries the JSON alone
    shown.out.print(
        Text.assemble(
            f"job {job['id']} ",
            styled_status(job["status"]),
            f" on {len(job.get('data') or [])} document(s)" if job.get("data") else "",
        )
    )
    if follow:
        job = follow_job(shown, client, job, interval, timeout)
    if as_json:
        print_json(job)
    if follow:
        raise typer.Exit(print_outcome(shown, job, metrics=not as_json))
