"""A small latency-injecting HTTP/1.1 TCP proxy: every request waits a fixed delay before it is
forwarded (our kernels have no netem), and every request is counted by operation.

    python -m bench.proxy --target 127.0.0.1:5000 --port 5001 --delay-ms 10

The proxy parses request framing only (head, then `Content-Length` or chunked body), so
keep-alive connections and concurrent connections behave as they would against S3; the
response bytes are piped back untouched. Requests to `/__proxy__/stats` (counts as JSON) and
`/__proxy__/reset` are answered by the proxy itself. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from urllib.parse import parse_qs, urlsplit

CONTROL_PREFIX = "/__proxy__/"


def operation(method: str, target: str, headers: dict[str, str]) -> str:
    """A coarse S3/SQS operation name for a request (for counting only)."""
    amz_target = headers.get("x-amz-target")
    if amz_target:  # SQS JSON protocol: AmazonSQS.ReceiveMessage
        return "sqs:" + amz_target.rsplit(".", 1)[-1]
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    if "Action" in query:
        return "sqs:" + query["Action"][0]
    if method == "GET" and query.get("list-type") == ["2"]:
        return "ListObjectsV2"
    if "tagging" in query:
        return {"GET": "GetObjectTagging", "PUT": "PutObjectTagging", "DELETE": "DeleteObjectTagging"}.get(
            method, method
        )
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    if method == "PUT" and "x-amz-copy-source" in headers:
        return "CopyObject"
    return {"GET": "GetObject", "PUT": "PutObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)


class Proxy:
    def __init__(self, target_host: str, target_port: int, delay_s: float) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.counts: Counter[str] = Counter()

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_w: asyncio.StreamWriter | None = None
        pipe: asyncio.Task | None = None
        try:
            while True:
                head = await _read_head(client_r)
                if head is None:
                    return
                method, target, headers = _parse_head(head)
                if target.startswith(CONTROL_PREFIX):
                    await _drain_body(client_r, headers, None)
                    self._control(target, client_w)
                    await client_w.drain()
                    return
                self.counts[operation(method, target, headers)] += 1
                await asyncio.sleep(self.delay_s)
                if upstream_w is None:
                    upstream_r, upstream_w = await asyncio.open_connection(self.target_host, self.target_port)
                    pipe = asyncio.create_task(_pipe(upstream_r, client_w))
                upstream_w.write(head)
                await _drain_body(client_r, headers, upstream_w)
                await upstream_w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if upstream_w is not None:
                upstream_w.close()
            if pipe is not None:
                try:
                    await asyncio.wait_for(pipe, 5)
                except Exception:
                    pipe.cancel()
            client_w.close()

    def _control(self, target: str, w: asyncio.StreamWriter) -> None:
        if target.startswith(CONTROL_PREFIX + "reset"):
            self.counts.clear()
            body = b"{}"
        else:
            body = json.dumps({"total": sum(self.counts.values()), "by_operation": dict(self.counts)}).encode()
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )


async def _read_head(r: asyncio.StreamReader) -> bytes | None:
    try:
        return await r.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    except asyncio.LimitOverrunError:
        raise ConnectionError("request head too large") from None


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return method, target, headers


async def _drain_body(r: asyncio.StreamReader, headers: dict[str, str], w: asyncio.StreamWriter | None) -> None:
    """Copy the request body (Content-Length or chunked) from `r` to `w` (or discard it)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await r.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            data = await r.readexactly(size + 2)
            if w is not None:
                w.write(size_line + data)
            if size == 0:  # trailers are not used by our clients
                return
    remaining = int(headers.get("content-length", "0") or 0)
    while remaining > 0:
        chunk = await r.read(min(remaining, 1 << 16))
        if not chunk:
            raise ConnectionError("client closed mid-body")
        remaining -= len(chunk)
        if w is not None:
            w.write(chunk)
            await w.drain()


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            chunk = await r.read(1 << 16)
            if not chunk:
                break
            w.write(chunk)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        try:
            w.close()
        except Exception:
            pass


async def serve(target: str, port: int, delay_ms: float) -> None:
    host, target_port = target.rsplit(":", 1)
    proxy = Proxy(host, int(target_port), delay_ms / 1000)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port, limit=1 << 20, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="host:port to forward to")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one; printed)")
    p.add_argument("--delay-ms", type=float, default=10.0, help="delay added to every request (default 10)")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.target, args.port, args.delay_ms))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
