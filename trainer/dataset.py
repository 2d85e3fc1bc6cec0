"""Conversations -> tokenized examples with assistant-only loss, plus packing and collation.

Why not `apply_chat_template(..., return_assistant_tokens_mask=True)`: it needs
`{% generation %}` markers that stock chat templates (Llama 3 included) lack, and without
them it silently returns an all-zero mask, i.e. nothing is trained. Instead each
conversation is rendered once per message prefix; the growth of the rendered string gives
every message's character span, and the tokenizer's offset mapping turns character spans
into token labels. Labels cover a trainable assistant turn's content and its end-of-turn
token (`<|eot_id|>`), so the model learns to stop; the role header is the prompt and is
never trained on.

Packing and attention (transformers 5.x, checked in `masking_utils.py`): with no
`attention_mask` and no cache, `create_causal_mask` calls `find_packed_sequence_indices`,
which starts a new sequence wherever `position_ids` do not increase by exactly one, and
masks attention across those boundaries, for sdpa and eager on CPU too (flash-attn is not
needed). Two things silently switch this off and let packed examples attend to each
other: passing any `attention_mask` (even all ones), and a cache, which the model creates
itself whenever `use_cache` is true, and checkpoints ship `use_cache: true` (in train mode
too, unless gradient checkpointing is on). HF `Trainer` sets `config.use_cache =
args.use_cache` (False by default) and TRL's SFTTrainer passes `use_cache=False`; a
hand-written loop must pass `use_cache=False` itself.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from transformers import PreTrainedTokenizerBase

from contracts.documents import ChatMessage, Conversation

T = TypeVar("T")

IGNORE_INDEX = -100

# Stands in for a message's content to find where the template puts content in a turn.
_SENTINEL = "AVATUNE_CONTENT_SENTINEL_3f9c"


@dataclass
class TokenizedExample:
    """One conversation as token ids; `labels` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    group: str = ""  # the conversation's stable key (`conversation_key`): its windows share it

    @property
    def num_trainable_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DatasetStats:
    """Counts over a build.

    `assistant_tokens` is a cross-check on the label mask: the tokens of each trainable
    assistant turn (content + end-of-turn), counted by tokenizing that turn's rendered
    span on its own. It equals `trainable_tokens` unless truncation cut a turn short
    (then `truncated` > 0). `examples` counts windows: a split conversation gives several.
    """

    examples: int = 0
    dropped: int = 0
    truncated: int = 0
    # Conversations longer than max_seq_length, cut into windows (see `conversation_windows`).
    split: int = 0
    total_tokens: int = 0
    trainable_tokens: int = 0
    assistant_tokens: int = 0


@dataclass
class _Rendered:
    """A rendered conversation and the character spans that are trained on."""

    text: str
    trainable_spans: list[tuple[int, int]]


def _is_trainable(message: ChatMessage) -> bool:
    return message.role == "assistant" and message.weight != 0


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _content_start(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    index: int,
    turn_start: int,
    full: str,
) -> int:
    """Character offset in `full` where message `index`'s content begins (after its header).

    Found by rendering the turn with a sentinel as content. The generation prompt would
    not do: stock Llama 3 puts `<|begin_of_text|>` inside the first message's turn, so
    for a conversation that opens with the assistant it is not a prefix of the turn.
    """
    probe = messages[:index] + [{"role": messages[index]["role"], "content": _SENTINEL}]
    rendered = _render(tokenizer, probe)
    header = rendered[turn_start : rendered.index(_SENTINEL)]
    if not full.startswith(header, turn_start):
        raise ValueError(f"chat template renders message {index}'s header inconsistently")
    return turn_start + len(header)


def _dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage], full: str | None = None
) -> _Rendered:
    """Render `messages` with the chat template (`full`: already rendered) and locate the
    trainable assistant spans."""
    dicts = _dicts(messages)
    full = full if full is not None else _render(tokenizer, dicts)
    spans: list[tuple[int, int]] = []
    turn_start = 0
    for index, message in enumerate(messages):
        prefix = _render(tokenizer, dicts[: index + 1])
        # Templates that rewrite earlier turns (e.g. dropping old reasoning) would make
        # prefix spans meaningless; refuse rather than mislabel.
        if not full.startswith(prefix):
            raise ValueError("chat template is not prefix-stable; cannot locate message spans")
        if _is_trainable(message):
            spans.append((_content_start(tokenizer, dicts, index, turn_start, full), len(prefix)))
        turn_start = len(prefix)
    return _Rendered(text=full, trainable_spans=spans)


def _labels_from_spans(
    token_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], text_len: int
) -> list[int]:
    # A token is trained on when its first character lies in a trainable span; a token
    # straddling header and content therefore stays with the (untrained) header.
    trainable = bytearray(text_len + 1)
    for start, end in spans:
        trainable[start:end] = b"\x01" * (end - start)
    return [tok if trainable[start] else IGNORE_INDEX for tok, (start, _end) in zip(token_ids, offsets)]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> Any:
    """Token ids and character offsets of a rendered conversation."""
    if not tokenizer.is_fast:
        raise TypeError("a fast tokenizer is needed: labels come from its offset mapping")
    # The template already wrote `<|begin_of_text|>`; the tokenizer must not add another.
    # verbose=False: over-long texts are expected here, they are truncated or windowed.
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)


def _tokenize_rendered(
    tokenizer: PreTrainedTokenizerBase, rendered: _Rendered, max_seq_length: int, enc: Any = None
) -> tuple[TokenizedExample | None, bool]:
    """The truncated example (None if nothing is left to train on) and whether it was cut.
    `enc`: the text's `_encode`, when the caller has it already."""
    enc = enc if enc is not None else _encode(tokenizer, rendered.text)
    input_ids: list[int] = enc["input_ids"]
    labels = _labels_from_spans(input_ids, enc["offset_mapping"], rendered.trainable_spans, len(rendered.text))
    truncated = len(input_ids) > max_seq_length
    example = TokenizedExample(input_ids=input_ids[:max_seq_length], labels=labels[:max_seq_length])
    return (example if example.num_trainable_tokens > 0 else None), truncated


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], max_seq_length: int
) -> TokenizedExample | None:
    """Tokenize one conversation with assistant-only labels, truncated to `max_seq_length`.

    Returns None when no trainable token survives (no trainable assistant turn, or all
    of them cut off by truncation).
    """
    if max_seq_length < 1:
        raise ValueError("max_seq_length must be positive")
    example, _ = _tokenize_rendered(tokenizer, _render_conversation(tokenizer, messages), max_seq_length)
    return example


def _span_token_count(tokenizer: PreTrainedTokenizerBase, rendered: _Rendered) -> int:
    return sum(
        len(tokenizer(rendered.text[start:end], add_special_tokens=False)["input_ids"])
        for start, end in rendered.trainable_spans
    )


def _token_count(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> int:
    return len(_encode(tokenizer, _render(tokenizer, _dicts(messages)))["input_ids"])


def _exchanges(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], list[list[ChatMessage]]]:
    """The leading system messages, and the rest cut before each user turn that follows
    another role: an exchange is a user's turn(s) and the replies to them."""
    head_end = 0
    while head_end < len(messages) and messages[head_end].role == "system":
        head_end += 1
    groups: list[list[ChatMessage]] = []
    for message in messages[head_end:]:
        if not groups or (message.role == "user" and groups[-1][-1].role != "user"):
            groups.append([message])
        else:
            groups[-1].append(message)
    return list(messages[:head_end]), groups


def conversation_windows(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    max_seq_length: int,
    length: int | None = None,
) -> list[list[ChatMessage]]:
    """`messages` as one window, or, when they render to more than `max_seq_length` tokens,
    as consecutive windows that each fit: cut between exchanges, each opening with the
    conversation's system messages, so a long chat export trains on every turn instead of its
    first `max_seq_length` tokens. An exchange too long on its own stays one window (it is
    truncated like any over-long conversation). `length`: the conversation's token count, if known."""
    if (length if length is not None else _token_count(tokenizer, messages)) <= max_seq_length:
        return [list(messages)]
    head, groups = _exchanges(messages)
    if len(groups) < 2:
        return [list(messages)]

    def window(start: int, end: int) -> list[ChatMessage]:
        return head + [m for group in groups[start:end] for m in group]

    def fits(start: int, end: int) -> bool:
        return _token_count(tokenizer, window(start, end)) <= max_seq_length

    windows: list[list[ChatMessage]] = []
    start = 0
    while start < len(groups):
        # The longest run of exchanges from `start` that fits: gallop, then bisect, so each
        # window costs O(its length x log) renders rather than a render of the whole rest.
        good, step = start + 1, 1
        while good + step <= len(groups) and fits(start, good + step):
            good += step
            step *= 2
        bad = min(good + step, len(groups) + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits(start, mid):
                good = mid
            else:
                bad = mid
        windows.append(window(start, good))
        start = good
    return windows


def build_examples(
    tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation], max_seq_length: int
) -> tuple[list[TokenizedExample], DatasetStats]:
    """Tokenize every conversation (a long one as several windows, `conversation_windows`);
    drop (and count) windows with nothing to train on."""
    if max_seq_length < 1:
        raise ValueError("max_seq_length must be positive")
    examples: list[TokenizedExample] = []
    stats = DatasetStats()
    for conversation in conversations:
        group = conversation_key(conversation)
        # Rendered and tokenized once: a conversation that fits (most do) reuses both.
        text = _render(tokenizer, _dicts(conversation.messages))
        enc = _encode(tokenizer, text)
        windows = conversation_windows(tokenizer, conversation.messages, max_seq_length, len(enc["input_ids"]))
        stats.split += len(windows) > 1
        for messages in windows:
            whole = len(windows) == 1
            rendered = _render_conversation(tokenizer, messages, text if whole else None)
            example, truncated = _tokenize_rendered(tokenizer, rendered, max_seq_length, enc if whole else None)
            if example is None:
                stats.dropped += 1
                continue
            example.group = group
            examples.append(example)
            stats.examples += 1
            stats.truncated += truncated
            stats.total_tokens += len(example)
            stats.trainable_tokens += example.num_trainable_tokens
            stats.assistant_tokens += _span_token_count(tokenizer, rendered)
    return examples, stats


# The held-out rule every version records (`held_out_rule` in its metrics), so a later job knows
# which examples an earlier version did not train on.
HELD_OUT_RULE = "conversation-hash/v1"
TAIL_RULE = "tail-windows/v1"
# The job named its held-out data itself (a `split: eval` dataset, e.g. OpenAI's validation_file).
EVAL_DATASET_RULE = "eval-dataset/v1"


def conversation_key(conversation: Conversation) -> str:
    """A conversation's stable key: the same conversation gets it in every job, whatever the
    document it sits in or the documents beside it."""
    return content_key(conversation)


def key_fraction(key: str) -> float:
    """Where a key falls in [0, 1): the held-out split's coordinate."""
    return int(key, 16) / 16 ** len(key) if key else 0.0


@dataclass
class HeldOutSplit:
    """Train and held-out examples, and the rule that made them. Under `conversation-hash/v1` a
    conversation is held out when `key_fraction(key) < cutoff`: stable across jobs (the same
    conversation is always on the same side for the same cutoff) and by conversation (every
    window of a long dialog on one side). A dataset of one conversation can only hold out its
    latest windows (`tail-windows/v1`)."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    rule: str = HELD_OUT_RULE
    cutoff: float = 0.0


def split_held_out(examples: Sequence[TokenizedExample], eval_fraction: float = 0.1) -> HeldOutSplit:
    """Split off the held-out examples (see HeldOutSplit). With at least two conversations and
    `eval_fraction` > 0, at least one conversation is held out and at least one trained on (the
    cutoff moves to the nearest key when `eval_fraction` alone would leave a side empty); with
    fewer than two examples everything is training data. Both parts keep the input order."""
    if not 0 <= eval_fraction < 1:
        raise ValueError("eval_fraction must be in [0, 1)")
    examples = list(examples)
    if len(examples) < 2 or eval_fraction == 0:
        return HeldOutSplit(examples, [], HELD_OUT_RULE, 0.0)
    points = sorted({key_fraction(ex.group) for ex in examples})
    if len(points) < 2:  # one conversation: its latest windows are held out
        n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
        return HeldOutSplit(examples[:-n_eval], examples[-n_eval:], TAIL_RULE, 0.0)
    train, held_out, cutoff = stable_split(examples, [ex.group for ex in examples], eval_fraction)
    return HeldOutSplit(train, held_out, HELD_OUT_RULE, cutoff)


def stable_split(items: Sequence[T], keys: Sequence[str], eval_fraction: float) -> tuple[list[T], list[T], float]:
    """(train, held out, cutoff): an item is held out when its key's fraction is below the
    cutoff, `eval_fraction` moved to the nearest key when it would leave a side empty (given
    two distinct keys). The same key is on the same side in every job with the same fraction."""
    points = sorted({key_fraction(key) for key in keys})
    if len(points) < 2 or eval_fraction == 0:
        return list(items), [], 0.0
    cutoff = eval_fraction
    if points[0] >= cutoff:  # nothing below the fraction: hold out the lowest key
        cutoff = math.nextafter(points[0], 1.0)
    if points[-1] < cutoff:  # everything below it: train on the highest one
        cutoff = points[-1]
    train = [item for item, key in zip(items, keys, strict=True) if key_fraction(key) >= cutoff]
    held_out = [item for item, key in zip(items, keys, strict=True) if key_fraction(key) < cutoff]
    return train, held_out, cutoff


def content_key(model: BaseModel) -> str:
    """A stable key of a pydantic value's content (a conversation, a judgement)."""
    return hashlib.sha256(model.model_dump_json().encode()).hexdigest()[:16]


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin indices: longest first, each into the fullest bin it still fits."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[i]
        if length > capacity:
            raise ValueError(f"example {i} has {length} tokens, more than max_seq_length={capacity}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([i])
            remaining, b = capacity - length, len(bins) - 1
        else:
            remaining, b = free.pop(slot)
            bins[b].append(i)
            remaining -= length
        if remaining > 0:
            bisect.insort(free, (remaining, b))
    return bins


def _packed_row(examples: list[TokenizedExample]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for example in examples:
        row["input_ids"] += example.input_ids
        # No loss on an example's first token: it would be predicted from the previous example.
        row["labels"] += [IGNORE_INDEX] + example.labels[1:]
        row["position_ids"] += list(range(len(example)))
        row["seq_lens"].append(len(example))
    return row


def pack_examples(examples: Sequence[TokenizedExample], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most `max_seq_length` tokens (best-fit decreasing).

    Each row has `input_ids`, `labels`, `position_ids` (restarting at 0 per example) and
    `seq_lens`. Examples stay independent only if the forward pass reads the boundaries
    from `position_ids`: no `attention_mask` and `use_cache=False` (see module docstring).
    """
    bins = _best_fit_decreasing([len(ex) for ex in examples], max_seq_length)
    return [_packed_row([examples[i] for i in members]) for members in bins]


def _sequence_starts(position_ids: list[int]) -> list[bool]:
    # The same rule transformers uses to find packed sequences: a break in +1 steps.
    return [t == 0 or position_ids[t] != position_ids[t - 1] + 1 for t in range(len(position_ids))]


def _as_list(values: Any) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def collate_padding_free(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Flatten a batch into one (1, total_tokens) sequence, like `DataCollatorWithFlattening`.

    Rows are packed rows (their `position_ids` are kept, so examples inside them stay
    separate) or plain examples (positions 0..n-1). The first token of every example
    gets label -100. No `attention_mask` is returned: its presence would disable the
    packed-sequence mask in transformers.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for row in rows:
        ids = _as_list(row["input_ids"])
        row_labels = _as_list(row["labels"]) if "labels" in row else ids
        row_positions = _as_list(row["position_ids"]) if "position_ids" in row else list(range(len(ids)))
        starts = _sequence_starts(row_positions)
        input_ids += ids
        labels += [IGNORE_INDEX if start else label for label, start in zip(row_labels, starts)]
        position_ids += row_positions
    if not input_ids:
        raise ValueError("collate_padding_free received an empty batch")
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
    }
