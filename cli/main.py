"""`avatune`: the command line over the avatune HTTP API.

Global options come before the command: `avatune --avatar my-avatar docs list`, or from the
environment (AVATUNE_API_URL, AVATUNE_TOKEN, AVATUNE_USER, AVATUNE_AVATAR).
Any failure prints one red line on stderr and exits with 1; never a traceback (AVATUNE_DEBUG=1
shows one for unexpected errors).
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from cli.client import ApiError, ApiUnreachable
from cli.commands import adapter, docs, feedback, jobs, webhooks
from cli.commands import generate as generation
from cli.context import DEFAULT_API_URL, CliError, State

# typer's own control-flow exceptions (usage errors, exits, aborts) pass through untouched. Recent
# typer releases vendor click, so these are typer's classes, found through its public names.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_PASS_THROUGH: tuple[type[BaseException], ...] = (_CLICK_ERROR, typer.Exit, typer.Abort)


def _fail(message: str, code: int = 1) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(Text(message, style="red"))
    return typer.Exit(code)


class _ErrorReportingGroup(TyperGroup):
    """Turns every expected failure of a command into one red line on stderr and exit code 1.

    Done here (not around `app()`) so `typer.testing.CliRunner` sees the same behaviour."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            raise _fail(f"error {exc.status}: {exc.detail}") from None
        except ApiUnreachable as exc:
            raise _fail(f"cannot reach {exc.what} at {exc.url}" + (f" ({exc.reason})" if exc.reason else "")) from None
        except CliError as exc:
            raise _fail(f"error: {exc}") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise _fail(f"error: {where}{exc.strerror or exc}") from None
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # a bug or a surprise: still one line, unless debugging
            if os.environ.get("AVATUNE_DEBUG"):
                raise
            raise _fail(
                f"unexpected error: {type(exc).__name__}: {exc} (set AVATUNE_DEBUG=1 for a traceback)"
            ) from None


app = typer.Typer(
    name="avatune",
    cls=_ErrorReportingGroup,
    help="Per-avatar LoRA adapter training over the avatune API.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # never print a token held in a local
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(docs.app, name="docs")
app.add_typer(jobs.app, name="jobs")
app.add_typer(adapter.app, name="adapter")
app.add_typer(webhooks.app, name="webhooks")
app.add_typer(feedback.app, name="feedback")
app.command("train")(jobs.train)
app.command("fuse")(adapter.fuse)
app.command("export")(adapter.export)
app.command("generate")(generation.generate)


@app.callback()
def main(
    ctx: typer.Context,
    api_url: Annotated[
        str, typer.Option("--api-url", envvar="AVATUNE_API_URL", help="the API's base URL")
    ] = DEFAULT_API_URL,
    token: Annotated[
        str | None,
        typer.Option(  # noqa: UP007 (typer needs Optional)
            "--token", envvar="AVATUNE_TOKEN", show_default=False, help="bearer token (JWT)"
        ),
    ] = None,
    user: Annotated[
        str | None,
        typer.Option(  # noqa: UP007
            "--user", envvar="AVATUNE_USER", show_default=False, help="user id; default: the token's `sub`"
        ),
    ] = None,
    avatar: Annotated[
        str | None,
        typer.Option(  # noqa: UP007
            "--avatar", "-a", envvar="AVATUNE_AVATAR", show_default=False, help="avatar id (for commands on one avatar)"
        ),
    ] = None,
) -> None:
    st = State(api_url=api_url.rstrip("/"), token=token or None, user=user or None, avatar=avatar or None)
    ctx.obj = st
    ctx.call_on_close(st.close)


@app.command("token")
def token(
    user_id: Annotated[str, typer.Argument(metavar="USER")],
    service: Annotated[bool, typer.Option("--service", help="a service token (may act for any user)")] = False,
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="lifetime in seconds")] = 86400,
) -> None:
    """Print a development token, like `python -m handlers.devtoken` (needs the API package)."""
    try:
        from handlers import settings as api_settings
        from handlers.auth import SERVICE_ROLE, issue_token
    except ImportError as exc:
        raise CliError(f"`avatune token` needs the API package installed (pip install 'avatune[api]'): {exc}") from None
    try:
        secret = api_settings.Settings().jwt_secret()  # fresh: read the environment of this run
    except Exception as exc:  # pydantic ValidationError on a bad variable
        raise CliError(f"invalid API settings in the environment: {exc}") from None
    if secret is None:
        # Like handlers.devtoken: mint for a `make dev` server (DEV_MODE, the public dev secret).
        secret = getattr(api_settings, "DEV_JWT_SECRET", None)
        if secret is None:
            raise CliError("no AUTH_JWT_SECRET set and DEV_MODE is off: cannot mint a token")
        Console(stderr=True, soft_wrap=True).print(
            Text(
                "AUTH_JWT_SECRET is not set here: this token is signed with the public dev secret and only works "
                "against a server in DEV_MODE",
                style="yellow",
            )
        )
    typer.echo(issue_token(secret, user_id, role=SERVICE_ROLE if service else None, ttl_seconds=ttl))


if __name__ == "__main__":
    app(prog_name="avatune")
