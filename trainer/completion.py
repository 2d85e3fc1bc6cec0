"""One greedy chat completion from a loaded causal LM: the shared core of generation jobs
(`trainer.jobs.generate`) and of the base-vs-adapter samples a training job stores.

    messages -> the tokenizer's chat template (add_generation_prompt) -> greedy generate
    (bounded by max_new_tokens) -> only the new tokens decoded

Dependency-light on purpose (torch and a model/tokenizer pair, nothing of the worker), so
evaluation code can import it without pulling in S3, SQS or PEFT.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
FinishReason = Literal["stop", "length"]


class CompletionFacts(TypedDict):
    """What `generate_completion` reports beside the text."""

    prompt: str  # the rendered prompt text the model saw (chat template applied)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason  # "stop": an end token was generated; "length": max_new_tokens reached
    seconds: float


class PromptTooLong(ValueError):
    """The rendered prompt plus max_new_tokens does not fit the model's context window."""


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The prompt text for `messages`: the tokenizer's chat template with the assistant's
    header appended (add_generation_prompt). A tokenizer without a template gets a plain
    "role: content" transcript ending in "assistant:" so a bare base model still answers."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in turns) + "assistant:"


def _end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a turn: the generation config's eos ids and the tokenizer's eos."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured if isinstance(configured, list) else [configured]) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def _context_window(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def greedy_new_token_ids(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy-decode at most `max_new_tokens` after `prompt_ids` and return only the new token
    ids. `model` may be a plain model or a PeftModel; it is put in eval mode for the call and
    restored afterwards. No context-window check: callers bound the prompt themselves."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    end_ids = _end_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (end_ids[0] if end_ids else None)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                # Unset sampling knobs a checkpoint's generation config may carry: greedy ignores them anyway.
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=end_ids or None,
                pad_token_id=pad_id,
                use_cache=True,  # training may have switched the config's cache off
            )
    finally:
        if was_training:
            model.train()
    return output[0, len(prompt_ids) :].tolist()


def generate_completion(
    model: Any, tokenizer: Any, messages: Sequence[Message], max_new_tokens: int
) -> tuple[str, CompletionFacts]:
    """Greedy-decode at most `max_new_tokens` after `messages` (chat template applied, with
    the generation prompt) and return (completion text, facts). Only the new tokens are
    decoded, without special tokens. `model` may be a plain model or a PeftModel; it is put
    in eval mode for the call and restored afterwards. Raises PromptTooLong when the prompt
    and max_new_tokens do not fit the model's context window, ValueError on bad arguments."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if not messages:
        raise ValueError("messages must not be empty")
    prompt = render_prompt(tokenizer, messages)
    # The template already wrote the BOS token: adding special tokens again would double it.
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    prompt_tokens = int(encoded["input_ids"].shape[1])
    window = _context_window(model)
    if window is not None and prompt_tokens + max_new_tokens > window:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it "
            f"exceeds the model's context window of {window} tokens"
        )
    started = time.monotonic()
    new_ids = greedy_new_token_ids(model, tokenizer, encoded["input_ids"][0].tolist(), max_new_tokens)
    seconds = time.monotonic() - started

    finish_reason: FinishReason = "length"
    if new_ids and new_ids[-1] in _end_token_ids(model, tokenizer):
        finish_reason = "stop"
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return text, CompletionFacts(
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(new_ids),
        finish_reason=finish_reason,
        seconds=round(seconds, 3),
    )
