"""`avatune adapter ...`, `avatune fuse` and `avatune export`: the avatar's trained adapter."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cli.client import ApiError
from cli.context import (
    CliError,
    JsonOutput,
    State,
    add_id_column,
    fmt_value,
    human_size,
    human_time,
    kv_table,
    list_table,
    parse_settings,
    print_json,
    short_time,
    state,
)

app = typer.Typer(help="The avatar's adapter: configuration, files, versions.", no_args_is_help=True)


def _print_adapter(st: State, adapter: dict[str, Any], *, files: bool = True) -> None:
    st.out.print(
        kv_table(
            {
                "avatar": st.avatar,
                "current version": adapter.get("current_version"),
                "updated": human_time(adapter.get("updated_at")),
            }
        )
    )
    st.out.print(kv_table(adapter.get("config") or {}, title="config"))
    if adapter.get("metrics"):
        st.out.print(kv_table(adapter["metrics"], title="metrics"))
    if files and adapter.get("files"):
        table = Table(title="files", title_justify="left")
        table.add_column("name", overflow="fold")
        table.add_column("sha256", overflow="fold")
        for f in adapter["files"]:
            table.add_row(Text(f["name"]), Text(f.get("sha256") or "-"))
        st.out.print(table)


# Short headers, so a version's row fits 80 columns beside its job id.
METRIC_HEADERS = {"train_loss": "loss", "eval_loss_before": "before", "eval_loss_after": "after"}


def _loss(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else fmt_value(value)


@app.command("show")
def show(ctx: typer.Context, as_json: JsonOutput = False) -> None:
    """Show the configuration, current version, metrics and files."""
    st = state(ctx)
    adapter = st.client().get_adapter()
    if as_json:
        print_json(adapter)
        return
    _print_adapter(st, adapter)


@app.command("list")
def list_adapters(ctx: typer.Context, as_json: JsonOutput = False) -> None:
    """The user's avatars that have an adapter."""
    st = state(ctx)
    items = st.client(avatar=False).list_adapters()
    if as_json:
        print_json(items)
        return
    if not items:
        st.out.print("no adapters")
        return
    table = list_table()
    add_id_column(table, "avatar", (a["avatar_id"] for a in items))
    table.add_column("version", justify="right")
    table.add_column("updated")
    for a in items:
        table.add_row(Text(a["avatar_id"]), str(a["current_version"]), human_time(a.get("updated_at")))
    st.out.print(table)


class ExportFormat(StrEnum):
    """The serving formats of `POST {base}/exports` (contracts.messages.ExportFormat)."""

    gguf = "gguf"
    peft = "peft"


class OutType(StrEnum):
    f16 = "f16"
    f32 = "f32"


ExportFormatOption = Annotated[
    ExportFormat | None,  # noqa: UP007
    typer.Option("--export", help="an export's files instead (see `avatune export`)"),
]


@app.command("download")
def download(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option(  # noqa: UP007
            "-o", "--output", file_okay=False, help="directory to write the files to; default: AVATAR-adapter"
        ),
    ] = None,
    export_format: ExportFormatOption = None,
    version: Annotated[
        int | None,  # noqa: UP007
        typer.Option("--version", min=1, help="with --export: the adapter version; default: current"),
    ] = None,
) -> None:
    """Download the current adapter's files, or with --export an export's (checked against their sha256)."""
    st = state(ctx)
    client = st.client()
    if export_format is None:
        if version is not None:
            raise CliError("--version goes with --export (the adapter's files are the current version's)")
        adapter = client.get_adapter()
        files = adapter.get("files") or []
        if not files:
            raise CliError(f"avatar {st.avatar!r} has no trained adapter yet: run `avatune train`")
        dest = output or Path(f"{st.avatar}-adapter")
        _download_files(st, files, dest)
        st.out.print(f"adapter version {adapter.get('current_version')}: {len(files)} file(s) in {dest}")
        return
    if version is None:
        version = client.get_adapter().get("current_version")
        if version is None:
            raise CliError(f"avatar {st.avatar!r} has no current adapter version: name one with --version")
    files = client.get_export(version, export_format.value).get("files") or []
    dest = output or Path(f"{st.avatar}-v{version}-{export_format.value}")
    _download_files(st, files, dest)
    st.out.print(f"{export_format.value} export of adapter version {version}: {len(files)} file(s) in {dest}")


def _download_files(st: State, files: list[dict[str, Any]], dest: Path) -> None:
    """Download presigned files into `dest`, each checked against its sha256."""
    client = st.client()
    for f in files:
        name = f["name"]
        if not name or Path(name).name != name or name in (".", ".."):
            raise CliError(f"refusing to write a file named {name!r}")
        size, digest = client.download_file(f["url"], dest / name)
        if f.get("sha256") and f["sha256"] != digest:
            (dest / name).unlink(missing_ok=True)
            raise CliError(f"{name}: sha256 mismatch (expected {f['sha256']}, got {digest}); download again")
        st.out.print(Text(f"wrote {dest / name} ({human_size(size)})"))


@app.command("exports")
def exports(ctx: typer.Context, as_json: JsonOutput = False) -> None:
    """List the avatar's complete exports (by version and format)."""
    st = state(ctx)
    items = st.client().list_exports()
    if as_json:
        print_json(items)
        return
    if not items:
        st.out.print("no exports: run `avatune export --format gguf` (or peft)")
        return
    table = list_table(f"exports of {st.avatar}")
    table.add_column("ver", justify="right", no_wrap=True)
    table.add_column("format", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("serving", no_wrap=True)
    add_id_column(table, "job", (e.get("job_id") for e in items))
    for e in items:
        serving = ", ".join(f"{engine}: {verdict}" for engine, verdict in sorted((e.get("serving") or {}).items()))
        table.add_row(
            str(e["adapter_version"]),
            e["format"] + (" + base" if e.get("include_base") else ""),
            short_time(e.get("created_at")),
            Text(serving or "-"),
            Text(e.get("job_id") or "-"),
        )
    st.out.print(table)


@app.command("versions")
def versions(ctx: typer.Context, as_json: JsonOutput = False) -> None:
    """List the kept versions (oldest first; * = current)."""
    st = state(ctx)
    client = st.client()
    items = client.list_versions()
    if as_json:
        print_json(items)
        return
    if not items:
        st.out.print("no adapter versions")
        return
    try:
        current = client.get_adapter().get("current_version")
    except ApiError:
        current = None
    metric_cols = [
        m
        for m in ("train_loss", "eval_loss_before", "eval_loss_after")
        if any(m in (v.get("metrics") or {}) for v in items)
    ]
    table = list_table(f"adapter versions of {st.avatar} (* current; loss: train; before/after: eval loss)")
    table.add_column("", width=1)
    table.add_column("ver", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    add_id_column(table, "job", (v.get("job_id") for v in items))
    for m in metric_cols:
        table.add_column(METRIC_HEADERS[m], justify="right", no_wrap=True)
    for v in items:
        metrics = v.get("metrics") or {}
        table.add_row(
            "*" if v["version"] == current else "",
            str(v["version"]),
            short_time(v.get("created_at")),
            Text(v.get("job_id") or "-"),
            *(_loss(metrics.get(m)) for m in metric_cols),
        )
    st.out.print(table)


@app.command("promote")
def promote(
    ctx: typer.Context, version: Annotated[int, typer.Argument(metavar="N", min=1)], as_json: JsonOutput = False
) -> None:
    """Make a kept version current again."""
    st = state(ctx)
    adapter = st.client().promote_version(version)
    if as_json:
        print_json(adapter)
        return
    st.out.print(f"adapter version {adapter.get('current_version')} is current")


@app.command("config")
def config(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Option("--method", help="qlora or lora")] = None,  # noqa: UP007
    r: Annotated[int | None, typer.Option("--r", help="LoRA rank")] = None,  # noqa: UP007
    lora_alpha: Annotated[float | None, typer.Option("--lora-alpha")] = None,  # noqa: UP007
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout")] = None,  # noqa: UP007
    target_modules: Annotated[
        str | None,
        typer.Option(  # noqa: UP007
            "--target-modules", help="comma-separated module names, e.g. q_proj,v_proj"
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="learning_rate")] = None,  # noqa: UP007
    epochs: Annotated[float | None, typer.Option("--epochs", help="num_epochs")] = None,  # noqa: UP007
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,  # noqa: UP007
    max_seq_length: Annotated[int | None, typer.Option("--max-seq-length")] = None,  # noqa: UP007
    warmup_ratio: Annotated[float | None, typer.Option("--warmup-ratio")] = None,  # noqa: UP007
    seed: Annotated[int | None, typer.Option("--seed")] = None,  # noqa: UP007
    set_: Annotated[
        list[str] | None,
        typer.Option(  # noqa: UP007
            "--set", metavar="KEY=VALUE", help="any other field (VALUE as JSON, else a string); repeatable"
        ),
    ] = None,
    as_json: JsonOutput = False,
) -> None:
    """Set adapter configuration fields (others keep their value); without options, show it."""
    st = state(ctx)
    fields: dict[str, Any] = {
        "method": method,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": [m.strip() for m in target_modules.split(",") if m.strip()] if target_modules else None,
        "learning_rate": lr,
        "num_epochs": epochs,
        "batch_size": batch_size,
        "max_seq_length": max_seq_length,
        "warmup_ratio": warmup_ratio,
        "seed": seed,
    }
    fields = {**parse_settings(set_), **{k: v for k, v in fields.items() if v is not None}}
    client = st.client()
    adapter = client.put_adapter(fields) if fields else client.get_adapter()
    if as_json:
        print_json(adapter)
        return
    if fields:
        st.out.print("updated " + ", ".join(f"{k}={fmt_value(v)}" for k, v in fields.items()))
    st.out.print(kv_table(adapter.get("config") or {}, title="config"))


def fuse(
    ctx: typer.Context,
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="the adapter version; default: current")
    ] = None,  # noqa: UP007
    as_json: JsonOutput = False,
) -> None:
    """Merge an adapter version into the base model (POST {base}/fuse-jobs)."""
    st = state(ctx)
    client = st.client()
    try:
        job = client.create_fuse_job(version)
    except ApiError as exc:
        if exc.is_missing_route:
            raise CliError(
                f"fuse is not supported by this server ({client.api_url} has no "
                f"POST .../fuse-jobs route; answered {exc.status})"
            ) from None
        raise
    if as_json:
        print_json(job)
        return
    job_id = job.get("id") or job.get("job_id") or "?"
    st.out.print(Text(f"fuse job {job_id}: {job.get('status', 'accepted')}"))


def export(
    ctx: typer.Context,
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="gguf (llama.cpp) or peft (vLLM, transformers)")
    ],
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="the adapter version; default: current")
    ] = None,  # noqa: UP007
    include_base: Annotated[bool, typer.Option("--include-base", help="gguf: the base model as GGUF too")] = False,
    outtype: Annotated[OutType | None, typer.Option("--outtype", help="gguf: the matrices' type (default f16)")] = None,  # noqa: UP007
    as_json: JsonOutput = False,
) -> None:
    """Write an adapter version in a serving format (POST {base}/exports); then
    `avatune jobs wait JOB` and `avatune adapter download --export FORMAT`."""
    st = state(ctx)
    body: dict[str, Any] = {"format": export_format.value, "adapter_version": version, "include_base": include_base}
    if outtype is not None:
        body["outtype"] = outtype.value  # the server refuses what does not apply to the format
    job = st.client().create_export(body)
    if as_json:
        print_json(job)
        return
    st.out.print(Text(f"export job {job.get('id', '?')}: {job.get('status', 'accepted')}"))
