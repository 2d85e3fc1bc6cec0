"""Tokenization with assistant-only loss, packing and padding-free batches, on a tiny Llama."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening

from contracts.documents import ChatMessage, Conversation, parse_document
from trainer import tiny_model
from trainer.dataset import (
    HELD_OUT_RULE,
    IGNORE_INDEX,
    TAIL_RULE,
    TokenizedExample,
    build_examples,
    collate_padding_free,
    conversation_key,
    conversation_windows,
    key_fraction,
    pack_examples,
    split_held_out,
    tokenize_conversation,
)
from trainer.tiny_model import write_tiny_model

EOT = "<|eot_id|>"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


# --- documents --------------------------------------------------------------------------

CHAT_JSONL = "\n".join(
    json.dumps(record)
    for record in [
        {
            "messages": [
                {"role": "system", "content": "You are Ada, a calm sailor."},
                {"role": "user", "content": "Where were you born?"},
                {"role": "assistant", "content": "By the sea, in a small town. 🌊"},
                {"role": "user", "content": "Do you miss it?"},
                {"role": "assistant", "content": "  Every single day!\n"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "SHOWN NOT TRAINED", "weight": 0},
                {"role": "user", "content": "Again, please."},
                {"role": "assistant", "content": "Hi, friend.", "weight": 1},
            ]
        },
    ]
).encode()

PROMPT_COMPLETION_JSONL = (
    b'{"prompt": "What do you cook?", "completion": "Fresh bread, mostly."}\n'
    b'{"prompt": "", "completion": "An empty prompt still trains."}\n'
)

TEXT_TXT = b"The avatar likes old music.\n\nIt writes about the ocean\nevery evening.\n\n\n  Short one.  \n"

DIALOG_JSON = json.dumps(
    {
        "speaker": "Ada",
        "dialog": [
            {"speaker": "Bob", "content": "Morning, Ada."},
            {"speaker": "Ada", "content": "Good morning, Bob!"},
            {"speaker": "Ada", "content": "Coffee?"},
            {"speaker": "Eve", "content": "Yes please."},
            {"speaker": "Ada", "content": "Coming right up."},
        ],
    }
).encode()

DOCUMENTS = {
    "chat.jsonl": CHAT_JSONL,
    "prompt_completion.jsonl": PROMPT_COMPLETION_JSONL,
    "notes.txt": TEXT_TXT,
    "dialog.json": DIALOG_JSON,
}


def _labelled_runs(example: TokenizedExample) -> list[tuple[int, int]]:
    """[start, end) token ranges of consecutive labelled tokens."""
    runs: list[tuple[int, int]] = []
    for t, label in enumerate(example.labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return runs


def _expected_runs(messages: list[ChatMessage]) -> list[str]:
    # The stock Llama 3 template trims content.
    return [m.content.strip() + EOT for m in messages if m.role == "assistant" and m.weight != 0]


def _msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role=role, content=content) for role, content in pairs]


# --- the tiny model ---------------------------------------------------------------------


def test_tiny_model_loads_and_generates(tiny_model_dir: Path, tokenizer, model) -> None:
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tiny_model_dir / "model.safetensors").exists()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOT)
    assert model.config.pad_token_id == tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id
    assert "{% generation" not in tokenizer.chat_template

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    same = write_tiny_model(tmp_path / "same")
    other = write_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (same / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (same / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (same / "tokenizer.json").read_bytes()


def test_tiny_model_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["tiny_model", str(out), "--hidden-size", "32", "--num-layers", "1"])
    runpy.run_path(tiny_model.__file__, run_name="__main__")
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_chat_template_renders_llama3_format(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    with_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert with_prompt == expected.removesuffix("Hello.<|eot_id|>")
    # Plain encoding adds BOS like Llama 3, so rendered templates must be tokenized without it.
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id


def test_stock_template_mask_is_all_zero(tokenizer) -> None:
    """Why dataset.py exists: without {% generation %} markers the built-in mask trains nothing."""
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    assert len(out["assistant_masks"]) == len(out["input_ids"]) > 0
    assert not any(out["assistant_masks"])


# --- labels -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_trained_tokens_are_exactly_the_assistant_turns(name: str, tokenizer) -> None:
    conversations = parse_document(name, DOCUMENTS[name])
    examples, stats = build_examples(tokenizer, conversations, max_seq_length=1024)

    assert stats.trainable_tokens == stats.assistant_tokens > 0
    assert (stats.examples, stats.dropped, stats.truncated) == (len(conversations), 0, 0)
    assert stats.total_tokens == sum(len(ex) for ex in examples)
    for conversation, example in zip(conversations, examples, strict=True):
        text = tokenizer.decode(example.input_ids)
        assert text == tokenizer.apply_chat_template(
            [m.model_dump(exclude={"weight"}) for m in conversation.messages], tokenize=False
        )
        runs = _labelled_runs(example)
        assert [tokenizer.decode(example.input_ids[a:b]) for a, b in runs] == _expected_runs(conversation.messages)
        for start, _ in runs:
            # Everything up to and including the assistant header is prompt, not target.
            assert tokenizer.decode(example.input_ids[:start]).endswith(ASSISTANT_HEADER)
        labelled = [(t, label) for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
        assert all(example.input_ids[t] == label for t, label in labelled)


def test_eot_after_each_assistant_turn_is_trained_and_headers_are_not(tokenizer) -> None:
    messages = _msgs(("user", "one"), ("assistant", "two"), ("user", "three"), ("assistant", "four"))
    example = tokenize_conversation(tokenizer, messages, max_seq_length=256)
    assert example is not None
    eot, bos = tokenizer.convert_tokens_to_ids(EOT), tokenizer.bos_token_id
    header_ids = set(tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"]))
    header_ids |= set(tokenizer("assistant\n\n", add_special_tokens=False)["input_ids"])

    eot_positions = [t for t, tok in enumerate(example.input_ids) if tok == eot]
    assert [example.labels[t] == eot for t in eot_positions] == [False, True, False, True]
    trained = {label for label in example.labels if label != IGNORE_INDEX}
    assert not trained & (header_ids | {bos})


def test_user_and_system_tokens_are_never_labelled(tokenizer) -> None:
    # The same words in every role: only the assistant's occurrence may be trained.
    messages = _msgs(("system", "red bicycle"), ("user", "red bicycle"), ("assistant", "red bicycle"))
    example = tokenize_conversation(tokenizer, messages, max_seq_length=256)
    assert example is not None
    content = tokenizer("red bicycle", add_special_tokens=False)["input_ids"]
    assert example.num_trainable_tokens == len(content) + 1
    last_turn = len(example) - len(content) - 1
    assert all(label == IGNORE_INDEX for label in example.labels[:last_turn])

    only_prompt = _msgs(("system", "rules"), ("user", "question"))
    assert tokenize_conversation(tokenizer, only_prompt, max_seq_length=256) is None


def test_weight_zero_assistant_turns_are_shown_not_trained(tokenizer) -> None:
    messages = [
        ChatMessage(role="user", content="hello"),
        ChatMessage(role="assistant", content="ignored reply", weight=0),
        ChatMessage(role="user", content="and now?"),
        ChatMessage(role="assistant", content="trained reply"),
    ]
    example = tokenize_conversation(tokenizer, messages, max_seq_length=256)
    assert example is not None
    assert "ignored reply" in tokenizer.decode(example.input_ids)
    assert [tokenizer.decode(example.input_ids[a:b]) for a, b in _labelled_runs(example)] == ["trained reply" + EOT]

    all_zero = [messages[0], messages[1]]
    examples, stats = build_examples(tokenizer, [Conversation(messages=all_zero)], max_seq_length=256)
    assert (examples, stats.dropped) == ([], 1)


def test_truncation_keeps_prefix_and_drops_untrainable(tokenizer) -> None:
    messages = _msgs(("user", "a fairly long question about the weather"), ("assistant", "a long answer " * 5))
    full = tokenize_conversation(tokenizer, messages, max_seq_length=10_000)
    assert full is not None
    cut_at = len(full) - 4
    cut = tokenize_conversation(tokenizer, messages, max_seq_length=cut_at)
    assert cut is not None and len(cut) == cut_at
    assert (cut.input_ids, cut.labels) == (full.input_ids[:cut_at], full.labels[:cut_at])

    first_trained = next(t for t, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert tokenize_conversation(tokenizer, messages, max_seq_length=first_trained) is None

    conversations = [Conversation(messages=messages)] * 3
    _, stats = build_examples(tokenizer, conversations, max_seq_length=cut_at)
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 3, 0)
    assert stats.trainable_tokens == 3 * cut.num_trainable_tokens < stats.assistant_tokens
    _, stats = build_examples(tokenizer, conversations, max_seq_length=first_trained)
    assert (stats.examples, stats.dropped) == (0, 3)


def _long_dialog(exchanges: int) -> list[ChatMessage]:
    """A system prompt, then exchanges of one or two user turns and one or two replies."""
    messages = [ChatMessage(role="system", content="You are Ann, who loves trains.")]
    for i in range(exchanges):
        messages.append(ChatMessage(role="user", content=f"question {i} about the journey"))
        if i % 3 == 0:
            messages.append(ChatMessage(role="user", content=f"and a follow-up {i}"))
        messages.append(ChatMessage(role="assistant", content=f"answer {i}: the train left on time"))
        if i % 4 == 1:
            messages.append(ChatMessage(role="assistant", content=f"also {i}: the food was great"))
    return messages


def test_a_long_conversation_is_cut_into_windows_that_train_every_turn(tokenizer) -> None:
    messages = _long_dialog(30)
    whole = tokenize_conversation(tokenizer, messages, max_seq_length=100_000)
    assert whole is not None
    max_seq_length = len(whole) // 5  # about five windows
    examples, stats = build_examples(tokenizer, [Conversation(messages=messages)], max_seq_length)

    assert stats.split == 1 and stats.truncated == 0 and stats.dropped == 0 and stats.examples == len(examples) >= 5
    assert all(len(ex) <= max_seq_length for ex in examples)
    assert stats.trainable_tokens == stats.assistant_tokens == whole.num_trainable_tokens
    # Every assistant turn is trained exactly once, in order, and each window opens with the system prompt.
    trained = [tokenizer.decode(ex.input_ids[a:b]) for ex in examples for a, b in _labelled_runs(ex)]
    assert trained == _expected_runs(messages)
    assert all("You are Ann, who loves trains." in tokenizer.decode(ex.input_ids[:40]) for ex in examples)

    windows = conversation_windows(tokenizer, messages, max_seq_length)
    assert [m for w in windows for m in w if m.role != "system"] == messages[1:]  # nothing lost or repeated
    for window in windows:
        assert window[0].role == "system" and window[1].role == "user"  # cut between exchanges
    # Each window is as long as it can be: the next exchange would not have fitted.
    for window, following in zip(windows, windows[1:]):
        end = next(
            (i for i in range(2, len(following)) if following[i].role == "user" and following[i - 1].role != "user"),
            len(following),
        )
        next_exchange = following[1:end]
        longer = tokenize_conversation(tokenizer, window + next_exchange, max_seq_length=100_000)
        assert longer is not None and len(longer) > max_seq_length
    # Short enough: one window, the conversation itself.
    assert conversation_windows(tokenizer, messages, len(whole)) == [messages]


# --- split, packing, collation ----------------------------------------------------------


def _conversation(i: int) -> Conversation:
    return Conversation(
        messages=[ChatMessage(role="user", content=f"q{i}"), ChatMessage(role="assistant", content=f"a{i}")]
    )


def _grouped(i: int, window: int = 0) -> TokenizedExample:
    """An example of conversation `i` (window `window` of it)."""
    return TokenizedExample(input_ids=[i, window], labels=[i, window], group=conversation_key(_conversation(i)))


def test_held_out_split_is_stable_across_jobs_and_by_conversation() -> None:
    """The same conversation is held out in every job whatever the documents beside it, and all
    windows of one conversation land on the same side."""
    first = split_held_out([_grouped(i, w) for i in range(60) for w in range(3)], eval_fraction=0.2)
    held = {ex.group for ex in first.eval}
    assert first.rule == HELD_OUT_RULE and 0 < len(held) < 60
    assert {ex.group for ex in first.train}.isdisjoint(held)
    # Another job: half the old conversations, in another order, and 40 new ones.
    later = split_held_out([_grouped(i) for i in [*range(59, 29, -1), *range(100, 140)]], eval_fraction=0.2)
    old = {conversation_key(_conversation(i)) for i in range(30, 60)}
    assert {ex.group for ex in later.eval} & old == held & old  # the same old ones held out
    assert later.cutoff == first.cutoff == 0.2
    for ex in first.eval:
        assert key_fraction(ex.group) < first.cutoff


def test_held_out_split_edges() -> None:
    two = [_grouped(1), _grouped(2)]
    split = split_held_out(two, eval_fraction=0.0001)  # both above the fraction: the lowest is held out
    assert len(split.eval) == 1 and len(split.train) == 1
    assert split_held_out(two, eval_fraction=0.0).eval == []
    assert split_held_out([_grouped(7)], eval_fraction=0.5).eval == []
    # One conversation in windows: its latest windows are held out.
    windows = [_grouped(9, w) for w in range(10)]
    tail = split_held_out(windows, eval_fraction=0.2)
    assert tail.rule == TAIL_RULE and tail.eval == windows[-2:] and tail.train == windows[:-2]


def _example(length: int, first_id: int = 0) -> TokenizedExample:
    """An example trained on every token, so boundary masking is visible."""
    ids = list(range(first_id, first_id + length))
    return TokenizedExample(input_ids=ids, labels=list(ids))


def test_best_fit_decreasing_packing() -> None:
    examples = [_example(n, first_id=100 * n) for n in (2, 6, 3, 5, 4)]
    rows = pack_examples(examples, max_seq_length=10)
    assert [row["seq_lens"] for row in rows] == [[6, 4], [5, 3, 2]]
    assert rows[0]["input_ids"] == list(range(600, 606)) + list(range(400, 404))
    # No loss on an example's first token: it would be predicted from the previous example.
    assert rows[0]["labels"] == [IGNORE_INDEX, *range(601, 606), IGNORE_INDEX, *range(401, 404)]
    assert rows[0]["position_ids"] == [*range(6), *range(4)]
    with pytest.raises(ValueError):
        pack_examples([_example(11)], max_seq_length=10)


def test_packing_keeps_every_token_and_restarts_positions(tokenizer) -> None:
    conversations = [c for name in sorted(DOCUMENTS) for c in parse_document(name, DOCUMENTS[name])]
    examples, stats = build_examples(tokenizer, conversations, max_seq_length=128)
    rows = pack_examples(examples, max_seq_length=128)

    assert len(rows) < len(examples)
    unpacked: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"]) <= 128
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start : start + n] == list(range(n))
            assert row["labels"][start] == IGNORE_INDEX
            unpacked.append((tuple(row["input_ids"][start : start + n]), tuple(row["labels"][start : start + n])))
            start += n
    assert sorted(unpacked) == sorted((tuple(ex.input_ids), tuple(ex.labels)) for ex in examples)
    assert sum(label != IGNORE_INDEX for row in rows for label in row["labels"]) == stats.trainable_tokens


def test_collate_matches_data_collator_with_flattening(tokenizer) -> None:
    examples, _ = build_examples(tokenizer, parse_document("chat.jsonl", CHAT_JSONL), max_seq_length=256)
    features = [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]
    ours = collate_padding_free(features)
    theirs = DataCollatorWithFlattening(return_tensors="pt")(features)
    assert set(ours) == {"input_ids", "labels", "position_ids"}
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_collate_masks_every_example_start() -> None:
    packed_row = {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]}
    plain_row = {"input_ids": [7, 8], "labels": [7, 8]}
    batch = collate_padding_free([packed_row, plain_row])
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8]]


def test_collate_packed_rows_keeps_example_boundaries() -> None:
    rows = pack_examples([_example(n, first_id=10 * n) for n in (3, 4, 5, 2)], max_seq_length=7)
    batch = collate_padding_free(rows)
    total = sum(len(row["input_ids"]) for row in rows)
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        "input_ids": (1, total),
        "labels": (1, total),
        "position_ids": (1, total),
    }
    positions = batch["position_ids"][0].tolist()
    starts = [t for t, p in enumerate(positions) if p == 0]
    assert len(starts) == 4
    assert all(batch["labels"][0, t] == IGNORE_INDEX for t in starts)
    # Flattening must not renumber positions inside a packed row.
    assert positions == [p for row in rows for p in row["position_ids"]]


# --- attention across packed examples ---------------------------------------------------


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean loss of predicting labels[t + 1] from logits[t] over labelled positions."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX).item()


def _per_example_losses(model, examples: list[TokenizedExample], **forward_kwargs) -> tuple[list[float], list[float]]:
    """Mean loss per example: run packed together in one row, and run each alone."""
    row = pack_examples(examples, max_seq_length=sum(len(ex) for ex in examples))
    assert len(row) == 1
    batch = collate_padding_free(row)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **forward_kwargs).logits[0]
        packed, start = [], 0
        for n in row[0]["seq_lens"]:
            packed.append(_mean_loss(logits[start : start + n], batch["labels"][0, start : start + n]))
            start += n
        # pack_examples puts the longest first; line the solo runs up the same way.
        ordered = sorted(examples, key=len, reverse=True)
        solo = [
            _mean_loss(
                model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0], torch.tensor(ex.labels)
            )
            for ex in ordered
        ]
    return packed, solo


@pytest.fixture(scope="module")
def forward_examples(tokenizer) -> list[TokenizedExample]:
    conversations = [c for name in sorted(DOCUMENTS) for c in parse_document(name, DOCUMENTS[name])][:4]
    examples, _ = build_examples(tokenizer, conversations, max_seq_length=256)
    return examples


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_forward_matches_separate_forwards(tiny_model_dir: Path, forward_examples, attn_implementation) -> None:
    """Packed examples do not attend to each other, on CPU, with sdpa or eager attention.

    transformers 5.x (`masking_utils.create_causal_mask`) finds packed sequences from
    `position_ids` (`find_packed_sequence_indices`: a new sequence wherever positions do
    not step by +1) and builds a block-diagonal causal mask; flash-attn is not needed.
    It only does so when no `attention_mask` and no cache are passed. The model creates a
    cache itself when `use_cache` is true, which is the config default of every Llama
    checkpoint, train mode included; so the padding-free forward needs `use_cache=False`
    (HF Trainer and TRL's SFTTrainer arrange that; a custom loop must pass it).
    """
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn_implementation).eval()
    assert model.config.use_cache  # the hazardous default, as in real checkpoints

    packed, solo = _per_example_losses(model, forward_examples, use_cache=False)
    assert packed == pytest.approx(solo, abs=1e-4)

    # The model's own loss over the padding-free batch is the token-weighted mean of the solos.
    batch = collate_padding_free(pack_examples(forward_examples, max_seq_length=1024))
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss
    trained = [ex.num_trainable_tokens for ex in sorted(forward_examples, key=len, reverse=True)]
    expected = sum(s * n for s, n in zip(solo, trained)) / sum(trained)
    assert loss.item() == pytest.approx(expected, abs=1e-4)

    # The true behaviour of the defaults: leaking attention, silently.
    for leaky in ({}, {"use_cache": False, "attention_mask": torch.ones_like(batch["input_ids"])}):
        packed, solo = _per_example_losses(model, forward_examples, **leaky)
        assert max(abs(p - s) for p, s in zip(packed, solo)) > 1e-3, leaky
    model.train()  # train mode does not switch the cache off (only gradient checkpointing does)
    packed, solo = _per_example_losses(model, forward_examples)
    assert max(abs(p - s) for p, s in zip(packed, solo)) > 1e-3
