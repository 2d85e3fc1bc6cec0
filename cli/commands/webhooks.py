"""`avatune webhooks listen`: a local webhook receiver for development.

Listens on HOST:PORT (any path), checks each delivery's `Avatune-Signature` against the
signing secret (the `make dev` events consumer's by default) and prints one line per
delivery: event, job, status, whether the signature held and whether an Authorization header
came (its value is never printed). A delivery whose signature does not hold is answered 401,
as a real receiver should; the rest 200. `--count N` exits after N deliveries.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from cli.context import CliError
from contracts.webhooks import DEV_SIGNING_SECRET, EVENT_TYPE_HEADER, SIGNATURE_HEADER, verify_signature

app = typer.Typer(no_args_is_help=True, help="Receive webhooks locally.")

MAX_BODY_BYTES = 1024 * 1024


def describe(headers: Any, body: bytes, secret: str) -> tuple[bool, Text]:
    """(signature holds or the delivery is unsigned and no secret is expected, the line to print)."""
    signature = headers.get(SIGNATURE_HEADER)
    if signature is None:
        ok, check = not secret, "unsigned"
    else:
        ok = bool(secret) and verify_signature(secret, signature, body)
        check = "signature ok" if ok else "signature INVALID"
    try:
        event = json.loads(body)
    except ValueError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    line = Text()
    line.append(f"{headers.get(EVENT_TYPE_HEADER) or event.get('event', '?')} ", style="bold")
    line.append(f"job {event.get('job_id', '?')} status {event.get('status', '?')}")
    if event.get("adapter_version") is not None:
        line.append(f" version {event['adapter_version']}")
    if event.get("error"):
        line.append(f" error {event['error']!r}")
    line.append(f"  [{check}]", style="green" if ok else "red")
    line.append("  authorization: " + ("present" if headers.get("Authorization") else "none"))
    return ok, line


def listen(
    host: Annotated[str, typer.Option("--host", help="the address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="the port (0: any free one)")] = 9000,
    secret: Annotated[
        str,
        typer.Option(
            "--secret",
            envvar="AVATUNE_WEBHOOK_SECRET",
            show_default=False,
            help="the signing secret to check Avatune-Signature with (default: make dev's); '' expects unsigned",
        ),
    ] = DEV_SIGNING_SECRET,
    count: Annotated[
        int | None,
        typer.Option(  # noqa: UP007
            "--count", min=1, help="exit after this many deliveries"
        ),
    ] = None,
    show_body: Annotated[bool, typer.Option("--body", help="also print each delivery's JSON body")] = False,
) -> None:
    """Receive webhook deliveries and print them (point a job's callbacks.webhook_url here)."""
    out = Console(soft_wrap=True)
    received: list[bool] = []
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.send_response(413)
                self.end_headers()
                return
            body = self.rfile.read(length)
            ok, line = describe(self.headers, body, secret)
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            out.print(line)
            if show_body:
                out.print(body.decode("utf-8", "replace"), markup=False, highlight=False)
            received.append(ok)
            if count is not None and len(received) >= count:
                done.set()

        def log_message(self, *args: Any) -> None:  # the line above says it all
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = server.server_address[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    Console(stderr=True, soft_wrap=True).print(
        f"listening on http://{host}:{bound}/ (a job's callbacks: "
        f'{{"webhook_url": "http://{shown}:{bound}/hook", "allow_private": true}}; from docker compose: '
        f"http://host.docker.internal:{bound}/hook with --host 0.0.0.0); Ctrl-C stops",
        markup=False,
        highlight=False,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
    if received and not all(received):
        raise typer.Exit(1)


app.command("listen")(listen)
