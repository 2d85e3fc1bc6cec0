"""Sentence-aware chunking: a text cut into chunks of at most `chunk_size` characters that
end at sentence boundaries where they can, neighbours sharing up to `chunk_overlap` characters
of whole sentences.

Every chunk is an exact slice of its text: `text[chunk.start:chunk.end] == chunk.text`, so a
passage can always be located in its source document. Pure Python, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends after . ! ? … (and any closing quotes/brackets) followed by whitespace, or at
# a blank line (paragraphs, Markdown headings and list items without final punctuation).
_SENTENCE_END = re.compile(r"""(?<=[.!?…。！？])["'”’)\]]*\s+|\n\s*\n\s*""")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    start: int  # character offsets into the chunked text, end exclusive
    end: int


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, without the whitespace between sentences."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((pos, match.start()))
        pos = match.end()
    spans.append((pos, len(text)))
    return [(s, e) for s, e in (_trimmed(text, s, e) for s, e in spans) if e > s]


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _split_long(text: str, start: int, end: int, size: int) -> list[tuple[int, int]]:
    """A sentence longer than `size`, cut at the last whitespace before each limit (or hard
    at the limit when a single word is longer)."""
    pieces: list[tuple[int, int]] = []
    while end - start > size:
        cut = start + size
        space = max((m.start() for m in _SPACE.finditer(text, start + 1, cut + 1)), default=-1)
        if space > start:
            cut = space
        pieces.append(_trimmed(text, start, cut))
        start, _ = _trimmed(text, cut, end)
    if end > start:
        pieces.append((start, end))
    return [p for p in pieces if p[1] > p[0]]


def chunk_text(text: str, chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    """Chunks of `text` (see the module doc). `chunk_overlap` must be smaller than `chunk_size`."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError("chunk_overlap must be at least 0 and smaller than chunk_size")
    units: list[tuple[int, int]] = []
    for start, end in _sentences(text):
        units.extend(_split_long(text, start, end, chunk_size) if end - start > chunk_size else [(start, end)])

    chunks: list[Chunk] = []
    i = 0
    while i < len(units):
        j = i + 1  # units[i:j] form the chunk; always at least one unit
        while j < len(units) and units[j][1] - units[i][0] <= chunk_size:
            j += 1
        start, end = units[i][0], units[j - 1][1]
        chunks.append(Chunk(text[start:end], start, end))
        if j == len(units):
            break
        # The next chunk starts with the trailing whole sentences of this one that fit in the
        # overlap and still leave room for the next new sentence; it always moves forward.
        k = j
        while k - 1 > i and end - units[k - 1][0] <= chunk_overlap and units[j][1] - units[k - 1][0] <= chunk_size:
            k -= 1
        i = k
    return chunks
