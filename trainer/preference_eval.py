"""Judging a preference adapter on held-out feedback, and what a person reads about it.

    before training: the starting model (the reference: the avatar's current adapter, or the
        base) scores each held-out reply: the sum of its tokens' log-probabilities
    after training:  the trained adapter scores the same replies
    -> metrics (`preference_metrics`):
       dpo: preference accuracy (share of held-out pairs whose implicit reward,
            beta * (log pi - log pi_ref), ranks chosen above rejected), mean reward margin, and
            the chosen-minus-rejected log-prob margin of the reference (`logp_margin_before`)
            and of the new adapter (`logp_margin_after`);
       kto: preference accuracy (share of held-out replies whose implicit reward has the right
            sign: up > 0, down < 0), mean reward margin (up minus down), and the desirable vs
            undesirable log-prob gap before and after
    -> the `promote: if_better` verdict (`decide`): the new adapter becomes current when its
       preference accuracy is above one half, i.e. on most held-out feedback it moved towards
       what the feedback prefers, relative to the current adapter (its reference)
    -> samples.json: greedy completions of the base, the previous adapter and the new one on a
       few held-out prompts (`preference_samples`)

Rewards are sums over a reply's tokens, as DPO's and KTO's are; the before/after numbers are
computed the same way on the same replies, so they compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contracts.adapters import SampleCompletion, VersionSamples
from contracts.keys import LOSS_CURVE_FILE, SAMPLES_FILE
from contracts.preferences import Judgement
from trainer.adapter_ops import adapter_attached
from trainer.completion import render_prompt
from trainer.evaluation import Evaluation, greedy_completion, plot_loss_curve, samples_failed

PASS_MARK = 0.5  # `if_better`: more than half of the held-out feedback must prefer the new adapter


@dataclass
class ReplyScores:
    """Summed log-probabilities of a judgement's replies under one model (None: no such reply)."""

    chosen: float | None
    rejected: float | None


def reply_ids(tokenizer: Any, prompt: list[dict[str, str]], reply: str, max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + reply, where the reply starts), as TRL tokenizes them: the chat
    template renders both, and the reply starts where they diverge. Cut to `max_length`."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": reply}], tokenize=True, return_dict=True
    )
    prompt_ids, full_ids = list(prompt_ids["input_ids"]), list(full_ids["input_ids"])
    shared = min(len(prompt_ids), len(full_ids))
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), shared)
    return full_ids[:max_length], start


@torch.no_grad()
def reply_logp(model: Any, ids: list[int], start: int, device: torch.device) -> float | None:
    """Sum of log p(token) over the reply's tokens (ids[start:]); None when none is left."""
    if start >= len(ids) or start < 1:
        return None
    inputs = torch.tensor([ids], device=device)
    logits = model(input_ids=inputs, use_cache=False).logits[0, :-1].float()
    targets = inputs[0, 1:]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(logps[start - 1 :].sum())


def score_judgements(
    model: Any, tokenizer: Any, judgements: list[Judgement], device: torch.device, max_length: int
) -> list[ReplyScores]:
    """Each judgement's replies scored by `model` (in eval mode; its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        scores = []
        for judgement in judgements:
            prompt = judgement.prompt_dicts()
            values = [
                None if reply is None else reply_logp(model, *reply_ids(tokenizer, prompt, reply, max_length), device)
                for reply in (judgement.chosen, judgement.rejected)
            ]
            scores.append(ReplyScores(*values))
        return scores
    finally:
        model.train(was_training)


# -- the metrics --------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _differences(scores: list[ReplyScores]) -> list[float]:
    return [s.chosen - s.rejected for s in scores if s.chosen is not None and s.rejected is not None]


def dpo_metrics(before: list[ReplyScores], after: list[ReplyScores], beta: float) -> dict[str, Any]:
    """Held-out pair metrics (see the module docstring)."""
    reference, policy = _differences(before), _differences(after)
    margins = [beta * (p - r) for p, r in zip(policy, reference)]
    return {
        "preference_accuracy": _mean([1.0 if m > 0 else 0.0 for m in margins]),
        "reward_margin": _mean(margins),
        "logp_margin_before": _mean(reference),
        "logp_margin_after": _mean(policy),
        "logp_accuracy_before": _mean([1.0 if d > 0 else 0.0 for d in reference]),
        "logp_accuracy_after": _mean([1.0 if d > 0 else 0.0 for d in policy]),
        "preference_eval_items": len(margins),
    }


def _rated(scores: list[ReplyScores]) -> tuple[list[float], list[float]]:
    """(desirable, undesirable) replies' scores, each half of a pair counted on its side."""
    up = [s.chosen for s in scores if s.chosen is not None]
    down = [s.rejected for s in scores if s.rejected is not None]
    return up, down


def _gap(up: list[float], down: list[float]) -> float | None:
    return round(sum(up) / len(up) - sum(down) / len(down), 6) if up and down else None


def kto_metrics(before: list[ReplyScores], after: list[ReplyScores], beta: float) -> dict[str, Any]:
    """Held-out rated-reply metrics (see the module docstring)."""
    up_before, down_before = _rated(before)
    up_after, down_after = _rated(after)
    up_rewards = [beta * (a - b) for a, b in zip(up_after, up_before)]
    down_rewards = [beta * (a - b) for a, b in zip(down_after, down_before)]
    right = [1.0 if r > 0 else 0.0 for r in up_rewards] + [1.0 if r < 0 else 0.0 for r in down_rewards]
    return {
        "preference_accuracy": _mean(right),
        "reward_margin": _gap(up_rewards, down_rewards),
        "desirable_logp_before": _mean(up_before),
        "desirable_logp_after": _mean(up_after),
        "undesirable_logp_before": _mean(down_before),
        "undesirable_logp_after": _mean(down_after),
        "logp_gap_before": _gap(up_before, down_before),
        "logp_gap_after": _gap(up_after, down_after),
        "preference_eval_items": len(right),
    }


def preference_metrics(
    objective: str, before: list[ReplyScores], after: list[ReplyScores], beta: float
) -> dict[str, Any]:
    return (dpo_metrics if objective == "dpo" else kto_metrics)(before, after, beta)


def decide(policy: str, metrics: dict[str, Any], against: str) -> tuple[bool, str]:
    """(promote?, why) for a preference adapter: `if_better` keeps the current adapter unless
    the held-out preference accuracy is above one half."""
    if policy != "if_better":
        return True, "promote: always"
    accuracy = metrics.get("preference_accuracy")
    if accuracy is None:
        return True, "no held-out feedback to compare on (EVAL_FRACTION / too little feedback): promoted"
    if not math.isfinite(accuracy):
        return False, f"preference accuracy is {accuracy}; the current adapter stays"
    if accuracy > PASS_MARK:
        return True, (
            f"held-out preference accuracy {accuracy:.4g} > {PASS_MARK}: the new adapter prefers what the "
            f"feedback prefers more than {against} does: promoted"
        )
    return False, (
        f"held-out preference accuracy {accuracy:.4g} <= {PASS_MARK}: the new adapter is not better than "
        f"{against} on held-out feedback; the current adapter stays"
    )


# -- samples ------------------------------------------------------------------------------------


@contextmanager
def _model_with(base: Any, adapter_dir: Path | None) -> Iterator[Any]:
    """The cached base with the adapter in `adapter_dir` attached (the base alone for None)."""
    if adapter_dir is None:
        yield base.model
        return
    with adapter_attached(base, adapter_dir) as model:
        yield model


def preference_samples(
    base: Any,
    previous_dir: Path | None,
    adapter_dir: Path,
    judgements: list[Judgement],
    *,
    job_id: str,
    count: int,
    max_new_tokens: int,
) -> VersionSamples:
    """samples.json of a preference job: for a few held-out prompts, what the base, the previous
    adapter (the reference; null when the job started from the base) and the new adapter answer."""
    tokenizer = base.tokenizer
    window = getattr(base.model.config, "max_position_embeddings", None)
    chosen: list[tuple[Judgement, list[int]]] = []
    for judgement in judgements:
        if len(chosen) >= count:
            break
        ids = tokenizer(render_prompt(tokenizer, judgement.prompt_dicts()), add_special_tokens=False)["input_ids"]
        if window is None or len(ids) + max_new_tokens <= window:
            chosen.append((judgement, ids))
    note = None if len(chosen) >= count else f"{len(chosen)} of {count} asked: the held-out feedback has no more"
    try:
        texts = {}
        for name, directory in (("base", None), ("previous", previous_dir), ("adapter", adapter_dir)):
            if name == "previous" and directory is None:
                continue
            with _model_with(base, directory) as model:
                texts[name] = [greedy_completion(model, tokenizer, ids, max_new_tokens) for _, ids in chosen]
    except Exception as exc:
        return samples_failed(job_id, max_new_tokens, exc)
    return VersionSamples(
        job_id=job_id,
        max_new_tokens=max_new_tokens,
        note=note,
        samples=[
            SampleCompletion(
                prompt=tokenizer.decode(ids, skip_special_tokens=False),
                reference=judgement.chosen or "",
                rejected=judgement.rejected,
                base=texts["base"][i],
                previous=texts["previous"][i] if "previous" in texts else None,
                adapter=texts["adapter"][i],
                prompt_tokens=len(ids),
            )
            for i, (judgement, ids) in enumerate(chosen)
        ],
    )


def evaluate_preference_version(
    base: Any,
    previous_dir: Path | None,
    adapter_dir: Path,
    judgements: list[Judgement],
    out_dir: Path,
    *,
    job_id: str,
    policy: str,
    metrics: dict[str, Any],
    against: str,
    sample_prompts: int,
    max_new_tokens: int,
) -> Evaluation:
    """The verdict (`decide`), samples.json (base, previous adapter, new adapter) and loss.png of
    a preference adapter; `metrics` are the job's (with the held-out preference metrics)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    promote, reason = decide(policy, metrics, against)
    found: dict[str, Any] = {"promote": policy, "promoted": promote, "promote_reason": reason, "compared_with": against}
    samples = preference_samples(
        base, previous_dir, adapter_dir, judgements, job_id=job_id, count=sample_prompts, max_new_tokens=max_new_tokens
    )
    (out_dir / SAMPLES_FILE).write_text(samples.model_dump_json(by_alias=True, indent=2))
    found["samples"] = len(samples.samples)
    plot_loss_curve(metrics.get("loss_curve") or {"train": [], "eval": []}, out_dir / LOSS_CURVE_FILE, f"job {job_id}")
    files = {SAMPLES_FILE: out_dir / SAMPLES_FILE, LOSS_CURVE_FILE: out_dir / LOSS_CURVE_FILE}
    return Evaluation(promote=promote, metrics=found, files=files)
