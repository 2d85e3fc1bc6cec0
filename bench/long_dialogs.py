"""Benchmark 7: long conversations (a chat export as one `.json` dialog) in the dataset build.

The trainer's `build_examples` cuts a conversation longer than `max_seq_length` into windows
between exchanges (`trainer.dataset.conversation_windows`). Baseline in the same run: the
earlier behaviour, one example truncated at `max_seq_length` (`tokenize_conversation`). Both
use the tiny model's tokenizer (trained on the spot, so token counts differ from Llama's; the
ratios are what matter). Measured: the share of the dialog's assistant tokens that are
trained on, and the time to build the examples.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, secs, table, today

MAX_SEQ_LENGTH = 1024


def dialog(exchanges: int) -> list[Any]:
    """A system prompt, then `exchanges` user/assistant pairs of chat-like length."""
    from contracts.documents import ChatMessage

    messages = [ChatMessage(role="system", content="You are Ann. Answer like Ann does in her chats.")]
    for i in range(exchanges):
        messages.append(
            ChatMessage(role="user", content=f"hey, about thing {i}: did the trip go as planned last summer?")
        )
        messages.append(
            ChatMessage(role="assistant", content=f"mostly! day {i} the train left on time and the food was great")
        )
    return messages


def run(sizes: tuple[int, ...] = (50, 200, 400), short_chats: int = 400, log=print) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench.throughput import synthetic_chats
    from contracts.documents import Conversation
    from trainer import dataset
    from trainer.dataset import build_examples, tokenize_conversation
    from trainer.tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    rows = []
    for exchanges in sizes:
        messages = dialog(exchanges)
        whole = tokenize_conversation(tokenizer, messages, 10**9)
        assert whole is not None
        t0 = time.perf_counter()
        truncated = tokenize_conversation(tokenizer, messages, MAX_SEQ_LENGTH)
        truncated_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        examples, stats = build_examples(tokenizer, [Conversation(messages=messages)], MAX_SEQ_LENGTH)
        windowed_seconds = time.perf_counter() - t0
        rows.append(
            {
                "exchanges": exchanges,
                "tokens": len(whole),
                "assistant_tokens": whole.num_trainable_tokens,
                "truncated_trained": truncated.num_trainable_tokens if truncated else 0,
                "truncated_seconds": truncated_seconds,
                "windows": len(examples),
                "windowed_trained": stats.trainable_tokens,
                "windowed_seconds": windowed_seconds,
                "longest": max(len(e) for e in examples),
            }
        )
        log(
            f"  {exchanges} exchanges: {len(examples)} windows, {windowed_seconds:.2f} s vs truncation "
            f"{truncated_seconds:.2f} s"
        )
    # Conversations that fit (most do): what the window check costs them, best of 3 alternating rounds.
    chats = synthetic_chats(short_chats, 0)
    plain, checked = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        for chat in chats:  # the build before windows: render, tokenize, count the spans
            rendered = dataset._render_conversation(tokenizer, chat.messages)
            dataset._tokenize_rendered(tokenizer, rendered, MAX_SEQ_LENGTH)
            dataset._span_token_count(tokenizer, rendered)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        build_examples(tokenizer, chats, MAX_SEQ_LENGTH)
        checked.append(time.perf_counter() - t0)
    short = {"chats": short_chats, "baseline": min(plain), "build": min(checked)}
    log(f"  {short_chats} short chats: build {short['build']:.2f} s vs {short['baseline']:.2f} s")
    return {"rows": rows, "short": short, "max_seq_length": MAX_SEQ_LENGTH, "machine": machine(), "date": today()}


def markdown(r: dict[str, Any], cmd: str) -> str:
    rows = []
    for row in r["rows"]:

        def share(n: int, row: dict[str, Any] = row) -> str:
            return f"{100 * n / row['assistant_tokens']:.0f}%"

        rows.append(
            [
                f"{row['exchanges']} ({row['tokens']:,} tokens)",
                f"{row['truncated_trained']:,} ({share(row['truncated_trained'])})",
                secs(row["truncated_seconds"]),
                f"**{row['windowed_trained']:,} ({share(row['windowed_trained'])})**",
                f"{row['windows']} (≤ {row['longest']} tokens)",
                f"**{secs(row['windowed_seconds'])}**",
                f"{row['truncated_seconds'] / row['windowed_seconds']:.1f}×",
            ]
        )
    headers = [
        "dialog exchanges",
        "baseline: truncated, assistant tokens trained",
        "baseline time",
        "windows: assistant tokens trained",
        "windows",
        "windows time",
        "speed-up",
    ]
    return f"""## 7. Long conversations: windows instead of truncation

One `.json` dialog (a chat export: a system prompt and N user/assistant exchanges) through the
trainer's dataset build at `max_seq_length` {r["max_seq_length"]}, with the tiny model's tokenizer.
Baseline in the same run: the earlier behaviour, one example truncated at `max_seq_length`.
Windows are cut between exchanges and each repeats the system prompt; the build renders each
window turn by turn, so it is also faster than rendering the whole dialog turn by turn (which
grows with the square of its length).

{table(headers, rows)}

Conversations that fit (most chats) pay for the check only: {r["short"]["chats"]} synthetic chats
(1–8 exchanges) build in {secs(r["short"]["build"])} against {secs(r["short"]["baseline"])} for the build
before windows (render, tokenize and count each conversation once, no length check):
{r["short"]["build"] / r["short"]["baseline"]:.2f}×, best of 3 alternating rounds. The fitting conversation's
render and tokenization are reused, so the check costs one more template render each.

Machine: {r["machine"]}. Date: {r["date"]}. Reproduce: `{cmd}` (this section: `python -m bench --only 7`).
"""
