"""What every command shares: the global options, the consoles, and the API client."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.client import AvatuneClient, token_subject

DEFAULT_API_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """A failure to report as one red line on stderr (exit code 1)."""


@dataclass
class State:
    api_url: str = DEFAULT_API_URL
    token: str | None = None
    user: str | None = None
    avatar: str | None = None
    out: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))
    _client: AvatuneClient | None = None

    def user_id(self) -> str:
        if self.user:
            return self.user
        if not self.token:
            raise CliError("no token: pass --token or set AVATUNE_TOKEN (`avatune token USER` mints a dev token)")
        sub = token_subject(self.token)
        if sub is None:
            raise CliError("cannot read the user from the token (no `sub` claim): pass --user or set AVATUNE_USER")
        return sub

    def client(self, *, avatar: bool = True) -> AvatuneClient:
        """The API client; `avatar`: the command works on one avatar, so --avatar is required."""
        if not self.token:
            raise CliError("no token: pass --token or set AVATUNE_TOKEN (`avatune token USER` mints a dev token)")
        if not self.api_url.startswith(("http://", "https://")):
            raise CliError(f"--api-url must start with http:// or https:// (got {self.api_url!r})")
        if avatar and not self.avatar:
            raise CliError("this command needs an avatar: pass --avatar or set AVATUNE_AVATAR")
        if self._client is None:
            self._client = AvatuneClient(self.api_url, self.token, self.user_id(), self.avatar)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` pairs (VALUE as JSON when it parses, else a string) as a dict."""
    fields: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            fields[key.strip()] = json.loads(raw)
        except ValueError:
            fields[key.strip()] = raw
    return fields


# `--json` on every command that answers with data: the API's JSON on stdout, as it came
# (for scripts and jq: `JOB=$(avatune train --json | jq -r .id)`); messages stay on stderr.
JsonOutput = Annotated[
    bool, typer.Option("--json", help="print the API's JSON answer on stdout (for scripts and jq) instead of a table")
]


def print_json(data: Any) -> None:
    """JSON on stdout, unwrapped whatever the terminal's width (rich would wrap long strings)."""
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):  # invoked without the root callback (direct command tests)
        obj = ctx.find_root().obj = State()
    return obj


# -- formatting ------------------------------------------------------------------------------


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def human_time(value: str | None, pattern: str = "%Y-%m-%d %H:%M:%S") -> str:
    """An API timestamp as `pattern` (as given when it does not parse; `-` when absent)."""
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).strftime(pattern)
    except ValueError:
        return value


def short_time(value: str | None) -> str:
    """`MM-DD HH:MM`, for table columns (80 columns hold a job id beside it)."""
    return human_time(value, "%m-%d %H:%M")


def list_table(title: str | None = None) -> Table:
    """A listing: a rule under the header and no vertical borders, so narrow terminals keep
    room for the columns."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        return ", ".join(f"{k}: {len(v)} points" for k, v in value.items())  # e.g. the loss curve
    return str(value)


STATUS_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def styled_status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def add_id_column(table: Table, header: str, ids: Iterable[str | None], **kwargs: Any) -> None:
    """A column of ids (jobs, documents) that are copied into the next command: never wrapped
    or cut, whatever the terminal's width (the other columns give way)."""
    width = max((len(i) for i in ids if i), default=len(header))
    table.add_column(header, no_wrap=True, min_width=max(width, len(header)), overflow="ignore", **kwargs)


def kv_table(rows: dict[str, Any], title: str | None = None) -> Table:
    table = Table(show_header=False, title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows.items():
        table.add_row(Text(key), value if isinstance(value, Text) else Text(fmt_value(value)))
    return table
