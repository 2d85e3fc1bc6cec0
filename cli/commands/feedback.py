"""`avatune feedback ...`: judgements of the avatar's replies, which `avatune train --objective
dpo|kto` learns from (POST/GET {base}/feedback, DELETE {base}/feedback/{id}).

    avatune feedback rate JOB_ID down                        a generation's reply, thumbs down
    avatune feedback rate --prompt "Hi" --reply "Yo." up     any reply
    avatune feedback correct JOB_ID "Hello! How are you?"    what the generation should have said
    avatune feedback correct --prompt "Hi" --rejected "Yo." "Hello!"   a pair of your own
    avatune feedback list | delete ID
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cli.context import CliError, fmt_value, human_time, state

app = typer.Typer(help="Feedback on the avatar's replies (for --objective dpo|kto training).", no_args_is_help=True)

PROMPT = typer.Option("--prompt", help="instead of a generation: the user message the reply answers")
SHORT = 60  # characters of a message shown in the list


def _context(generation_id: str | None, prompt: str | None, reply_option: str, reply: str | None) -> dict[str, Any]:
    """The body's context part: the generation, or --prompt and the reply given."""
    if (generation_id is None) == (prompt is None):
        raise CliError("give a GENERATION_ID or --prompt (not both)")
    if generation_id is not None:
        if reply is not None:
            raise CliError(f"{reply_option} goes with --prompt: a generation brings its own reply")
        return {"generation_id": generation_id}
    if reply is None:
        raise CliError(f"--prompt needs {reply_option} (the reply being judged)")
    return {"messages": [{"role": "user", "content": prompt}]}


def _print_item(ctx: typer.Context, item: dict[str, Any]) -> None:
    st = state(ctx)
    what = f"rated {item['rating']}" if item["kind"] == "rating" else "pair (chosen over rejected)"
    st.out.print(Text(f"feedback {item['id']}: {what}, stored as {item['document']}"))


@app.command("rate")
def rate(
    ctx: typer.Context,
    first: Annotated[
        str,
        typer.Argument(
            metavar="[GENERATION_ID] up|down", help="a generation job (`avatune generate`), then the rating"
        ),
    ],
    second: Annotated[str | None, typer.Argument(hidden=True)] = None,  # noqa: UP007
    prompt: Annotated[str | None, PROMPT] = None,  # noqa: UP007
    reply: Annotated[str | None, typer.Option("--reply", help="with --prompt: the reply rated")] = None,  # noqa: UP007
) -> None:
    """Rate a reply up or down: a generation's (GENERATION_ID up|down) or one given with --prompt/--reply."""
    generation_id, rating = (first, second) if second is not None else (None, first)
    if rating not in ("up", "down"):
        raise CliError(f"the rating is up or down, not {rating!r}")
    body = _context(generation_id, prompt, "--reply", reply)
    if generation_id is None:
        body["reply"] = reply
    item = state(ctx).client().post_feedback({**body, "rating": rating})
    _print_item(ctx, item)


@app.command("correct")
def correct(
    ctx: typer.Context,
    first: Annotated[
        str,
        typer.Argument(metavar="[GENERATION_ID] BETTER_REPLY", help="a generation job, then what it should have said"),
    ],
    second: Annotated[str | None, typer.Argument(hidden=True)] = None,  # noqa: UP007
    prompt: Annotated[str | None, PROMPT] = None,  # noqa: UP007
    rejected: Annotated[
        str | None,
        typer.Option("--rejected", help="with --prompt: the reply the better one replaces"),  # noqa: UP007
    ] = None,
) -> None:
    """Say what the reply should have been: a pair with the better reply chosen."""
    generation_id, better = (first, second) if second is not None else (None, first)
    body = _context(generation_id, prompt, "--rejected", rejected)
    if generation_id is None:
        body.update(chosen=better, rejected=rejected)
    else:
        body.update(rating="down", correction=better)
    _print_item(ctx, state(ctx).client().post_feedback(body))


def _short(text: str | None) -> str:
    if text is None:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= SHORT else flat[: SHORT - 1] + "…"


@app.command("list")
def list_feedback(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="show at most this many (newest first)")] = 20,
) -> None:
    """List the avatar's feedback, newest first."""
    st = state(ctx)
    items = []
    for item in st.client().iter_feedback(page_size=min(limit, 100)):
        items.append(item)
        if len(items) >= limit:
            break
    if not items:
        st.out.print("no feedback")
        return
    table = Table(title=f"feedback on {st.avatar}", title_justify="left")
    for column in ("id", "created", "kind", "prompt", "chosen", "rejected", "generation", "training"):
        table.add_column(column, overflow="fold")
    for item in items:
        kind = item["kind"] if item["kind"] == "pair" else f"rated {item['rating']}"
        table.add_row(
            Text(item["id"]),
            human_time(item.get("created_at")),
            kind,
            Text(_short(item["messages"][-1]["content"] if item.get("messages") else None)),
            Text(_short(item.get("chosen"))),
            Text(_short(item.get("rejected"))),
            fmt_value(item.get("generation_id")),
            fmt_value(item.get("use_for_training")),
        )
    st.out.print(table)


@app.command("delete")
def delete(ctx: typer.Context, feedback_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Delete one feedback item."""
    state(ctx).client().delete_feedback(feedback_id)
    state(ctx).out.print(f"deleted feedback {feedback_id}")
