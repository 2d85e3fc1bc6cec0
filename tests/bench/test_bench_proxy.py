"""The benchmark harness itself: the latency proxy forwards HTTP/1.1 unchanged (keep-alive,
bodies of either framing), delays every request and counts it; BENCHMARKS.md sections are
replaced in place. No timing is asserted beyond the proxy's own minimum delay."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, stop


class _Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(self.path.encode())

    def do_PUT(self) -> None:  # noqa: N802
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    break
                data += chunk
        else:
            data = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(data[::-1])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def proxied() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.proxy", "--target", f"127.0.0.1:{server.server_port}", "--delay-ms", "20"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("ready "), line
        yield f"http://127.0.0.1:{line.split()[1]}"
    finally:
        stop(proc)
        server.shutdown()


def test_proxy_forwards_delays_and_counts(proxied: str) -> None:
    with httpx.Client(base_url=proxied) as client:  # one keep-alive connection
        assert client.get("/__proxy__/reset").status_code == 200
        t0 = time.perf_counter()
        for i in range(5):
            assert client.get(f"/bucket/key-{i}?tagging").text == f"/bucket/key-{i}?tagging"
        assert time.perf_counter() - t0 >= 5 * 0.02
        assert client.put("/bucket/obj", content=b"hello").content == b"olleh"

        def chunks() -> Iterator[bytes]:
            yield b"ab"
            yield b"cd"

        assert client.put("/bucket/obj2", content=chunks()).content == b"dcba"
        assert client.get("/bucket?list-type=2&prefix=x").status_code == 200
        stats = client.get("/__proxy__/stats").json()
    assert stats == {"total": 8, "by_operation": {"GetObjectTagging": 5, "PutObject": 2, "ListObjectsV2": 1}}


def test_benchmarks_md_sections_are_replaced_in_place(tmp_path: Path) -> None:
    from bench.__main__ import HEADER, write_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(HEADER)
    write_section(3, "## 3. three\nfirst", path)
    write_section(1, "## 1. one", path)
    write_section(3, "## 3. three\nsecond", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "first" not in text and "second" in text
    assert text.index("## 1. one") < text.index("## 3. three")
    assert text.count("<!-- bench:3 -->") == 1
