"""RAG prompts: the passages retrieved for a conversation, put into it.

    the conversation's last user message -> its passages (`trainer.rag.search`) -> a system
    message with the numbered passages and their sources, ahead of the conversation (or appended
    to its own system message) -> as many passages as fit the model's window, best first

Pure functions: generation jobs (`trainer.jobs.generate`) use them, tests call them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer.completion import Message, render_prompt

RAG_INSTRUCTION = (
    "Answer the user's question using the context passages below when they are relevant. "
    "If they do not contain the answer, say so instead of guessing."
)


# -- prompt building (pure) -------------------------------------------------------------------


def query_of(messages: Sequence[Message]) -> str:
    """What to retrieve passages for: the last user message."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    raise ValueError("a RAG generation needs a user message to retrieve passages for")


def rag_context(passages: Sequence[dict[str, Any]]) -> str:
    """The passages as one block of text, numbered and with their sources."""
    blocks = []
    for number, passage in enumerate(passages, start=1):
        source = passage.get("source")
        heading = f"[{number}]" + (f" (source: {source})" if source else "")
        blocks.append(f"{heading}\n{str(passage.get('text', '')).strip()}")
    return RAG_INSTRUCTION + "\n\nContext:\n\n" + "\n\n".join(blocks)


def build_rag_messages(messages: Sequence[Message], passages: Sequence[dict[str, Any]]) -> list[Message]:
    """`messages` with the passages in a system message ahead of the conversation. An
    existing leading system message keeps its text and gets the context appended (many chat
    templates accept one system message, first). No passages: the messages unchanged."""
    chat = [dict(m) for m in messages]
    if not passages:
        return chat
    context = rag_context(passages)
    if chat and chat[0]["role"] == "system":
        chat[0]["content"] = chat[0]["content"].rstrip() + "\n\n" + context
        return chat
    return [{"role": "system", "content": context}, *chat]


def fit_rag_messages(
    tokenizer: Any, messages: Sequence[Message], passages: Sequence[dict[str, Any]], max_prompt_tokens: int | None
) -> tuple[list[Message], list[dict[str, Any]]]:
    """`build_rag_messages` with as many of the (best-first) passages as fit `max_prompt_tokens`
    once rendered; the messages and the passages used. None: no limit."""
    used = list(passages)
    while True:
        chat = build_rag_messages(messages, used)
        if max_prompt_tokens is None or not used:
            return chat, used
        tokens = len(tokenizer(render_prompt(tokenizer, chat), add_special_tokens=False)["input_ids"])
        if tokens <= max_prompt_tokens:
            return chat, used
        used.pop()  # the weakest passage goes first


PASSAGE_KEYS = ("text", "score", "source", "chunk_id", "metadata")
PROVENANCE_KEYS = ("etag", "start", "end")  # shown when the store reports them


def passage_view(found: dict[str, Any]) -> dict[str, Any]:
    """A retrieved passage as the result shows it (JSON-safe)."""
    passage = {key: found.get(key) for key in PASSAGE_KEYS}
    passage.update({key: found[key] for key in PROVENANCE_KEYS if key in found})
    if passage["score"] is not None:
        passage["score"] = round(float(passage["score"]), 6)
    return passage
