"""Streaming zip archives: entries are written as their bytes arrive, never held whole."""

from __future__ import annotations

import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable


class _ChunkSink:
    """A write-only, unseekable file for ZipFile that hands out what was written so far."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._written = 0

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:  # zipfile records entry offsets from this
        return self._written

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


async def zip_stream(
    entries: AsyncIterator[str], open_entry: Callable[[str], Awaitable[AsyncIterator[bytes]]]
) -> AsyncIterator[bytes]:
    """Yield a zip archive holding each named entry, whose bytes come from `open_entry(name)`."""
    sink = _ChunkSink()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_DEFLATED) as archive:  # type: ignore[arg-type]
        async for name in entries:
            body = await open_entry(name)
            with archive.open(name, mode="w", force_zip64=True) as entry:
                async for chunk in body:
                    entry.write(chunk)
                    if sink_bytes := sink.drain():
                        yield sink_bytes
            if sink_bytes := sink.drain():
                yield sink_bytes
    if rest := sink.drain():
        yield rest
