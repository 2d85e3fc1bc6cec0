"""`avatune docs ...`: the avatar's training documents."""

from __future__ import annotations

import sys
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cli.client import ApiError
from cli.context import CliError, JsonOutput, add_id_column, human_size, list_table, print_json, short_time, state

app = typer.Typer(help="Training documents of the avatar.", no_args_is_help=True)

# Lambda caps request bodies near 6 MB and the API's MAX_UPLOAD_BYTES defaults to 5 MiB: larger
# files go straight to S3 through a presigned URL.
PRESIGN_THRESHOLD = 5 * 1024 * 1024


class Which(StrEnum):
    used = "used"
    unused = "unused"
    all = "all"


ARCHIVE_FLAG = {Which.used: "true", Which.unused: "false", Which.all: "all"}


@app.command("upload")
def upload(
    ctx: typer.Context,
    files: Annotated[
        list[Path],
        typer.Argument(exists=True, dir_okay=False, readable=True, help="documents (.jsonl, .json dialog, .txt)"),
    ],
    train: Annotated[bool, typer.Option("--train/--no-train", help="flag the documents use_for_training")] = True,
    presign_over: Annotated[
        int,
        typer.Option(
            "--presign-over",
            metavar="BYTES",
            envvar="AVATUNE_PRESIGN_OVER",
            hidden=True,
            help="upload files larger than this through a presigned URL",
        ),
    ] = PRESIGN_THRESHOLD,
    as_json: JsonOutput = False,
) -> None:
    """Upload documents (multipart; files over 5 MB through a presigned S3 URL)."""
    st = state(ctx)
    client = st.client()
    usage = "used for training" if train else "not used for training"
    failed = 0
    uploaded: list[dict] = []
    if as_json:  # stdout carries the JSON alone
        st = replace(st, out=st.err)
    for path in files:
        size = path.stat().st_size
        try:
            if size > presign_over:
                uploaded.append(client.upload_large(path, use_for_training=train))
                st.out.print(
                    Text(
                        f"uploaded {path.name} ({human_size(size)}, {usage}) via a presigned URL; "
                        "the trainer validates it before training"
                    )
                )
                continue
            try:
                doc = client.upload_document(path, use_for_training=train)
            except ApiError as exc:
                if exc.status != 413:
                    raise
                # The server's MAX_UPLOAD_BYTES is below our threshold: go around it.
                uploaded.append(client.upload_large(path, use_for_training=train))
                st.out.print(
                    Text(
                        f"uploaded {path.name} ({human_size(size)}, {usage}) via a presigned URL "
                        "(too large for the API); the trainer validates it before training"
                    )
                )
                continue
            uploaded.append(doc)
            st.out.print(Text(f"uploaded {doc['name']} ({human_size(doc.get('size'))}, {usage})"))
        except ApiError as exc:
            failed += 1
            detail = exc.detail if exc.detail.startswith(path.name) else f"{path.name}: {exc.detail}"
            st.err.print(Text(f"error {exc.status}: {detail}", style="red"))
    if as_json:
        print_json(uploaded)
    if failed:
        raise typer.Exit(1)


@app.command("list")
def list_documents(
    ctx: typer.Context,
    used: Annotated[
        bool | None,
        typer.Option(  # noqa: UP007 (typer needs Optional here)
            "--used/--unused",
            help="only the documents used (or not used) for training; default: all",
            show_default=False,
        ),
    ] = None,
    page_size: Annotated[int | None, typer.Option("--page-size", min=1, max=1000, help="documents per request")] = None,  # noqa: UP007
    as_json: JsonOutput = False,
) -> None:
    """List documents (all pages)."""
    st = state(ctx)
    docs = list(st.client().iter_documents(used, page_size=page_size))
    if as_json:
        print_json(docs)
        return
    if not docs:
        st.out.print("no documents" + ("" if used is None else (" used for training" if used else " unused")))
        return
    table = list_table(f"training data of {st.avatar}")
    add_id_column(table, "name", (d["name"] for d in docs))
    table.add_column("size", justify="right")
    table.add_column("train")
    table.add_column("modified")
    table.add_column("type")
    for d in docs:
        table.add_row(
            Text(d["name"]),
            human_size(d.get("size")),
            Text("yes", style="green") if d.get("use_for_training") else Text("no", style="dim"),
            short_time(d.get("last_modified")),
            Text((d.get("content_type") or "-").split(";")[0]),
        )
    st.out.print(table)
    flagged = sum(1 for d in docs if d.get("use_for_training"))
    st.out.print(f"{len(docs)} document{'s' if len(docs) != 1 else ''}, {flagged} used for training")


@app.command("flag")
def flag(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="NAME", help="document names")],
    on: Annotated[bool, typer.Option("--on/--off", help="use for training (--on) or not (--off)", show_default=False)],
    as_json: JsonOutput = False,
) -> None:
    """Set use_for_training on documents."""
    st = state(ctx)
    client = st.client()
    changed = []
    for name in names:
        doc = client.set_flag(name, on)
        changed.append(doc)
        if not as_json:
            st.out.print(Text(f"{doc['name']}: {'used' if doc['use_for_training'] else 'not used'} for training"))
    if as_json:
        print_json(changed)


@app.command("rm")
def remove(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="NAME", help="document names")],
) -> None:
    """Delete documents."""
    st = state(ctx)
    client = st.client()
    for name in names:
        client.delete_document(name)
        st.out.print(Text(f"deleted {name}"))


@app.command("clean")
def clean(ctx: typer.Context, as_json: JsonOutput = False) -> None:
    """Delete every document not used for training."""
    st = state(ctx)
    n = st.client().delete_documents(use_for_training=False)
    if as_json:
        print_json({"deleted": n})
        return
    st.out.print(f"deleted {n} document{'s' if n != 1 else ''} not used for training")


@app.command("download")
def download(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="the document; omit with --archive")] = None,  # noqa: UP007
    archive: Annotated[bool, typer.Option("--archive", help="download a zip of the documents instead")] = False,
    which: Annotated[Which, typer.Option("--which", help="with --archive: which documents")] = Which.used,
    output: Annotated[
        Path | None,
        typer.Option(  # noqa: UP007
            "-o",
            "--output",
            help="where to write ('-' = stdout); default: NAME, or AVATAR-training-data.zip",
            dir_okay=True,
        ),
    ] = None,
) -> None:
    """Download one document, or every document used for training as a zip (--archive)."""
    st = state(ctx)
    if archive == (name is not None):
        raise CliError("give either a document NAME or --archive")
    client = st.client()
    dest: Path
    if name is not None:
        dest = output or Path(Path(name).name)
        fetch = lambda target: client.download_document(name, target)  # noqa: E731
    else:
        dest = output or Path(f"{st.avatar}-training-data.zip")
        fetch = lambda target: client.download_archive(target, ARCHIVE_FLAG[which])  # noqa: E731
    if str(dest) == "-":
        fetch(sys.stdout.buffer)
        sys.stdout.flush()
        return
    if dest.is_dir():
        dest = dest / (Path(name).name if name else f"{st.avatar}-training-data.zip")
    size, _ = fetch(dest)
    st.out.print(Text(f"wrote {dest} ({human_size(size)})"))
