"""A tiny, randomly initialised Llama-3-style model and tokenizer, built offline.

Tests and benchmarks need a real `LlamaForCausalLM` checkpoint folder that loads with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`, but there is no
hub access. `write_tiny_model` builds one in a couple of seconds: a byte-level BPE
tokenizer trained on a generated English corpus, with Llama 3's special tokens, its
pre-tokenizer regex and its stock chat template (no `{% generation %}` markers), plus a
Llama model with random weights whose config agrees with the tokenizer.

    python -m trainer.tiny_model OUT_DIR [--hidden-size 512 --num-layers 8 ...]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# Llama 3.1's reserved pad token: a pad distinct from every end token, so masking padding
# can never mask a real end-of-turn.
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]

# Llama 3's pre-tokenizer split pattern (from its tokenizer.json): "\n\n" after the header
# stays one pre-token, as in the real model.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The stock Llama 3 Instruct template (including its `| trim`), which has no
# `{% generation %}` markers: assistant masks must not depend on them.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_SUBJECTS = [
    "the avatar",
    "my friend",
    "a teacher",
    "the old captain",
    "our team",
    "she",
    "he",
    "they",
    "the user",
    "the assistant",
    "a small robot",
    "the writer",
    "my sister",
    "the doctor",
    "every student",
    "the baker",
    "a quiet neighbour",
    "the system",
    "this model",
    "we",
    "you",
    "I",
]
_VERBS = [
    "likes",
    "remembers",
    "writes about",
    "talks about",
    "answers",
    "explains",
    "asks about",
    "thinks about",
    "reads",
    "builds",
    "wants",
    "finds",
    "loves",
    "hates",
    "learns",
    "teaches",
    "describes",
    "forgets",
    "plans",
    "cooks",
    "paints",
    "visits",
    "trains",
    "helps with",
]
_OBJECTS = [
    "the weather",
    "a long story",
    "the mountains",
    "fresh bread",
    "old music",
    "the ocean",
    "a new language",
    "the garden",
    "this question",
    "the morning news",
    "a good book",
    "the city at night",
    "their first job",
    "coffee and tea",
    "the training data",
    "a letter",
    "the children",
    "the holidays",
    "machine learning",
    "the red bicycle",
    "a funny joke",
]
_TAILS = [
    "",
    " every day",
    " in the evening",
    " with great care",
    " because it matters",
    " when it rains",
    " after dinner",
    " again and again",
    " for the first time",
    " without thinking",
    " in 2024",
    " at 7 o'clock",
    " twice a week",
]
_OPENERS = ["", "Well, ", "Honestly, ", "Yes, ", "No, ", "Sure! ", "Hello! ", "I think ", "Maybe "]
_ENDINGS = [".", ".", ".", "!", "?", "...", "; really.", " :)"]


def _sentence(rng: random.Random) -> str:
    text = (
        rng.choice(_OPENERS)
        + rng.choice(_SUBJECTS)
        + " "
        + rng.choice(_VERBS)
        + " "
        + rng.choice(_OBJECTS)
        + rng.choice(_TAILS)
        + rng.choice(_ENDINGS)
    )
    return text[0].upper() + text[1:]


def _corpus(num_lines: int = 3000) -> Iterator[str]:
    """A fixed pseudo-random English corpus; its own RNG keeps the tokenizer seed-independent."""
    rng = random.Random(1234)
    for _ in range(num_lines):
        yield " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
    # Chat-shaped lines, so role names and the header's "\n\n" get single tokens as in Llama 3.
    for i in range(600):
        yield f"{('system', 'user', 'assistant')[i % 3]}\n\n{_sentence(rng)}"


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Llama 3 special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Special tokens are appended after training (as in Llama 3, they sit at the end).
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.Sequence(
        [
            # trim_offsets=False keeps offsets exact; dataset.py maps characters to tokens.
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS} $B",
                special_tokens=[(BOS, tok.token_to_id(BOS))],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None,
    intermediate_size: int | None,
    max_position_embeddings: int,
    seed: int,
) -> LlamaForCausalLM:
    """A randomly initialised Llama whose config agrees with `tokenizer`."""
    if num_kv_heads is None:
        # Grouped-query attention like Llama 3, so k/v projections are narrower than q.
        num_kv_heads = num_heads // 2 if num_heads % 2 == 0 else num_heads
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eot_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # fork_rng: seed the weights without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        # Like Llama 3 Instruct: stop at end of turn or end of text.
        eos_token_id=[eot_id, tokenizer.convert_tokens_to_ids(EOS)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def write_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama-3-style model + tokenizer to `out_dir` and return it.

    Deterministic for given arguments. `hidden_size=512, num_layers=8, num_heads=8` gives
    about 32M parameters for benchmarks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    model = build_model(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _use_portable_tokenizer_class(out)
    return out


def _use_portable_tokenizer_class(out: Path) -> None:
    """Name the tokenizer class as real Llama 3 checkpoints do.

    transformers 5 writes its new `TokenizersBackend` class name, which transformers 4
    cannot load; `PreTrainedTokenizerFast` loads in both (5 maps it to the same backend).
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.tiny_model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_tiny_model(
        args.out_dir,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    print(out)


if __name__ == "__main__":
    main()
