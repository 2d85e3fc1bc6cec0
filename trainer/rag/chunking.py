"""Sentence-aware chunking: a text cut into chunks of at most `chunk_size` characters that
end at sentence boundaries where they can, neighbours sharing up to `chunk_overlap` characters
of whole sentences.

Every chunk is an exact slice of its text: `text[chunk.start:chunk.end] == chunk.text`, so a
passage can always be located in its source document. Pure Python, no torch.

Markdown (`markdown=True`, the `.md` context documents): a heading opens a section and every
section is chunked on its own, so a heading always starts a chunk, together with the first
sentences under it, instead of trailing the previous section's last chunk (where it would
describe text it does not belong to and cost its own section retrieval rank). Overlap never
reaches back across a heading. ATX (`## Rice`) and setext (`Rice` over `====`) headings count;
lines inside fenced code blocks do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A sentence ends after . ! ? … (and any closing quotes/brackets) followed by whitespace, or at
# a blank line (paragraphs, Markdown headings and list items without final punctuation).
_SENTENCE_END = re.compile(r"""(?<=[.!?…。！？])["'”’)\]]*\s+|\n\s*\n\s*""")
_SPACE = re.compile(r"\s+")
_ATX_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t]|$)")
_SETEXT_UNDERLINE = re.compile(r" {0,3}(?:=+|-+)[ \t]*$")
_FENCE = re.compile(r" {0,3}(?:```|~~~)")


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    start: int  # character offsets into the chunked text, end exclusive
    end: int


def _sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text[start:end]`, without the whitespace between them."""
    end = len(text) if end is None else end
    spans: list[tuple[int, int]] = []
    pos = start
    for match in _SENTENCE_END.finditer(text, start, end):
        spans.append((pos, match.start()))
        pos = match.end()
    spans.append((pos, end))
    return [(s, e) for s, e in (_trimmed(text, s, e) for s, e in spans) if e > s]


def _lines(text: str) -> list[tuple[int, str]]:
    """(offset, line without its newline) of every line."""
    lines, pos = [], 0
    for line in text.splitlines(keepends=True):
        lines.append((pos, line.rstrip("\r\n")))
        pos += len(line)
    return lines


def _heading_lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of every Markdown heading's text line, outside fenced code blocks."""
    headings: list[tuple[int, int]] = []
    lines = _lines(text)
    fenced = False
    for i, (offset, line) in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or not line.strip():
            continue
        setext = (
            i + 1 < len(lines)
            and _SETEXT_UNDERLINE.match(lines[i + 1][1])
            and not line.startswith(("    ", "\t", "-", "*", "+", ">"))
            and not _ATX_HEADING.match(line)
        )
        if _ATX_HEADING.match(line):
            headings.append((offset, offset + len(line)))
        elif setext:  # the title line and its underline
            headings.append((offset, lines[i + 1][0] + len(lines[i + 1][1])))
    return headings


def _units(text: str, start: int, end: int, size: int, heading: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The pieces chunks are packed from: the section's heading line (if any), then its
    sentences, those longer than `size` cut at word boundaries."""
    units: list[tuple[int, int]] = []
    spans = _sentences(text, start, end)
    if heading is not None:
        spans = [_trimmed(text, *heading), *_sentences(text, heading[1], end)]
    for s, e in spans:
        units.extend(_split_long(text, s, e, size) if e - s > size else [(s, e)])
    return [u for u in units if u[1] > u[0]]


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


def chunk_text(text: str, chunk_size: int, chunk_overlap: int, *, markdown: bool = False) -> list[Chunk]:
    """Chunks of `text` (see the module doc). `chunk_overlap` must be smaller than `chunk_size`;
    `markdown`: each heading starts a chunk (its section is chunked on its own)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError("chunk_overlap must be at least 0 and smaller than chunk_size")
    headings = _heading_lines(text) if markdown else []
    starts = [0] + [h[0] for h in headings if h[0] > 0]
    ends = starts[1:] + [len(text)]
    by_start = {h[0]: h for h in headings}
    chunks: list[Chunk] = []
    for start, end in zip(starts, ends):
        chunks.extend(
            _packed(text, _units(text, start, end, chunk_size, by_start.get(start)), chunk_size, chunk_overlap)
        )
    return chunks


def _packed(text: str, units: list[tuple[int, int]], chunk_size: int, chunk_overlap: int) -> list[Chunk]:
    """Consecutive units packed into chunks of at most `chunk_size` characters."""
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
