"""Judging a freshly trained adapter, and what a person reads about it.

    during training: LossCurveCallback evaluates the held-out split at a few evenly spaced
        steps (start and end come from train_adapter's eval_loss_before / _after) and keeps
        the points in the Trainer's log_history, so a resumed job keeps its curve
    after training:  evaluate_version -> the base's and the adapter's greedy completions on a
        few held-out prompts (samples.json), the loss curve drawn (loss.png) and, for
        `promote: if_better`, the current adapter's eval loss on the same split, to decide
        whether the new version becomes current

Adapters are attached to the worker's cached base for these checks and removed again, so the
base comes back untouched, as after training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from contracts.adapters import SampleCompletion, VersionSamples
from contracts.keys import LOSS_CURVE_FILE, SAMPLES_FILE
from trainer.adapter_ops import adapter_attached, adapter_eval_loss
from trainer.completion import greedy_new_token_ids
from trainer.dataset import HELD_OUT_RULE, IGNORE_INDEX, TokenizedExample, key_fraction

log = logging.getLogger("avatune.trainer")

# Eval points during training besides the start and the end (each costs one pass over the
# held-out split, which is small: EVAL_FRACTION of the data).
CURVE_EVAL_POINTS = 5
# The train curve in metrics.json (and the job record) is thinned to this many points; the
# record is read on every GET of the job, so it stays small even for long runs.
MAX_TRAIN_CURVE_POINTS = 500
ADAPTER_CONFIG_FILE = "adapter_config.json"

Curve = dict[str, list[list[float | None]]]  # {"train": [[step, loss], ...], "eval": [[step, loss], ...]}


# -- the loss curve ---------------------------------------------------------------------------


def eval_steps(max_steps: int, points: int = CURVE_EVAL_POINTS) -> set[int]:
    """`points` steps evenly spaced strictly between 0 and `max_steps` (fewer on short runs)."""
    if max_steps <= 1 or points <= 0:
        return set()
    steps = {round(max_steps * k / (points + 1)) for k in range(1, points + 1)}
    return {s for s in steps if 0 < s < max_steps}


def _finite(value: Any) -> float | None:
    """A loss as JSON can carry it: a diverged (inf/nan) loss becomes null."""
    if value is None:
        return None
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


class LossCurveCallback(TrainerCallback):
    """Evaluates the held-out split at a few steps and records the points in
    `state.log_history` as {"eval_loss", "step"} (saved in every checkpoint with the state)."""

    def __init__(
        self, evaluate: Callable[[], float | None], start_loss: float | None, points: int = CURVE_EVAL_POINTS
    ) -> None:
        self._evaluate = evaluate
        self._start_loss = start_loss
        self._points = points
        self._due: set[int] = set()

    def on_train_begin(self, args, state: TrainerState, control: TrainerControl, **kwargs) -> None:  # type: ignore[override]
        self._due = eval_steps(state.max_steps, self._points)
        # A resumed run's state (loaded before this call) already has its start point.
        if state.global_step == 0 and self._start_loss is not None and state.is_world_process_zero:
            state.log_history.append({"eval_loss": _finite(self._start_loss), "step": 0})

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **kwargs) -> None:  # type: ignore[override]
        # Rank 0 alone evaluates (its curve is the one kept); a stopping job skips the work.
        if state.global_step not in self._due or control.should_training_stop or not state.is_world_process_zero:
            return
        loss = self._evaluate()
        if loss is not None:
            state.log_history.append({"eval_loss": _finite(loss), "step": state.global_step})

    @staticmethod
    def curve(state: TrainerState, eval_after: float | None) -> Curve:
        """Train loss per logged step and eval loss at start, the evaluated steps and the end."""
        return loss_curve(state.log_history, state.global_step, eval_after)


def loss_curve(log_history: list[dict[str, Any]], final_step: int, eval_after: float | None) -> Curve:
    train: dict[int, float | None] = {}
    evals: dict[int, float | None] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        if "loss" in entry:
            train[int(entry["step"])] = _finite(entry["loss"])
        if "eval_loss" in entry:
            evals[int(entry["step"])] = _finite(entry["eval_loss"])
    if eval_after is not None:
        evals[final_step] = _finite(eval_after)
    return {
        "train": _thin([[s, v] for s, v in sorted(train.items())], MAX_TRAIN_CURVE_POINTS),
        "eval": [[s, v] for s, v in sorted(evals.items())],
    }


def _thin(points: list[list[Any]], limit: int) -> list[list[Any]]:
    """At most `limit` points, evenly spaced, the first and the last kept."""
    if len(points) <= limit:
        return points
    last = len(points) - 1
    return [points[round(i * last / (limit - 1))] for i in range(limit)]


def plot_loss_curve(curve: Curve, path: Path, title: str = "loss") -> Path:
    """Draw the train and eval curves to a PNG at `path` (matplotlib's Agg canvas: no display)."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state, safe off the main thread
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    train = [(s, v) for s, v in curve.get("train", []) if v is not None]
    evals = [(s, v) for s, v in curve.get("eval", []) if v is not None]
    if train:
        ax.plot(*zip(*train), linewidth=1, alpha=0.8, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", linewidth=1.5, label="eval loss (held-out)")
    values = [v for _, v in train + evals]
    if values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")  # a diverging run would flatten everything else
    if not values:
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# -- samples -----------------------------------------------------------------------------------


@dataclass
class HeldOutPrompt:
    prompt_ids: list[int]  # the conversation up to its first trained answer (the assistant header included)
    reference_ids: list[int]  # that answer


def held_out_prompts(
    examples: list[TokenizedExample], count: int, max_prompt_tokens: int | None
) -> list[HeldOutPrompt]:
    """The first `count` held-out examples that have a prompt (and fit `max_prompt_tokens`)."""
    prompts: list[HeldOutPrompt] = []
    for ex in examples:
        if len(prompts) >= count:
            break
        start = next((i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX), None)
        if not start or (max_prompt_tokens is not None and start > max_prompt_tokens):
            continue
        end = next((i for i in range(start, len(ex.labels)) if ex.labels[i] == IGNORE_INDEX), len(ex.labels))
        prompts.append(HeldOutPrompt(ex.input_ids[:start], ex.input_ids[start:end]))
    return prompts


def greedy_completion(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> str:
    """Greedy-decode at most `max_new_tokens` after `prompt_ids`; only the new text."""
    return tokenizer.decode(
        greedy_new_token_ids(model, tokenizer, prompt_ids, max_new_tokens), skip_special_tokens=True
    )


# -- the verdict ------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What evaluate_version found: metrics to add, files to store beside metrics.json, and
    whether the version becomes current."""

    promote: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class CurrentAdapter:
    """The avatar's current adapter, downloaded, for `promote: if_better`, and its metrics (the
    held-out rule it trained with says which examples it never saw)."""

    version: int
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


# Eval losses closer than this (relative) are a tie: the difference is rounding and batch order,
# not evidence. A tie promotes (if_better keeps the current adapter only on evidence).
TIE_TOLERANCE = 1e-3


def decide(policy: str, eval_after: float | None, reference: float | None, against: str) -> tuple[bool, str]:
    """(promote?, why). `if_better` keeps the current adapter only on evidence that the new one
    is worse: a higher (or diverged) eval loss on examples neither trained on; a difference within
    TIE_TOLERANCE is reported as a tie and promotes."""
    if policy != "if_better":
        return True, "promote: always"
    if eval_after is None:
        return True, "no held-out examples to compare on (EVAL_FRACTION / too few examples): promoted"
    if not math.isfinite(eval_after):
        return False, f"eval loss diverged ({eval_after}); the current adapter stays"
    if reference is None or not math.isfinite(reference):
        return True, f"{against} has no finite eval loss to compare with: promoted"
    delta = eval_after - reference
    relative = abs(delta) / max(abs(reference), 1e-12)
    shown = f"{eval_after:.8g} vs {reference:.8g} of {against} (difference {delta:+.3g}, {relative:.3%})"
    if relative <= TIE_TOLERANCE:
        return True, f"eval loss tied: {shown}, within {TIE_TOLERANCE:.1%}: promoted"
    if delta < 0:
        return True, f"eval loss improved: {shown}: promoted"
    return False, f"eval loss got worse: {shown}; the current adapter stays"


def comparable_examples(
    eval_examples: list[TokenizedExample], new: dict[str, Any], current: dict[str, Any]
) -> tuple[list[TokenizedExample], str]:
    """The held-out examples that neither the new version nor the current one trained on, and a
    note. Under the same conversation-hash rule, the current version held out every conversation
    below its cutoff, so the examples below both cutoffs are unseen by both."""
    rule = new.get("held_out_rule")
    if rule != HELD_OUT_RULE or current.get("held_out_rule") != HELD_OUT_RULE:
        return eval_examples, (
            f"the current version's held-out rule is {current.get('held_out_rule') or 'unrecorded'} and this "
            f"job's is {rule}: it may have trained on some of these examples"
        )
    cutoff = min(float(new.get("held_out_cutoff") or 0.0), float(current.get("held_out_cutoff") or 0.0))
    unseen = [ex for ex in eval_examples if key_fraction(ex.group) < cutoff]
    return unseen, f"{len(unseen)} of {len(eval_examples)} held-out examples neither version trained on"


def evaluate_version(
    base: Any,
    adapter_dir: Path,
    eval_examples: list[TokenizedExample],
    out_dir: Path,
    *,
    job_id: str,
    policy: str,
    current: CurrentAdapter | None,
    metrics: dict[str, Any],
    sample_prompts: int,
    max_new_tokens: int,
) -> Evaluation:
    """Samples, loss plot and the promotion verdict for the version trained into `adapter_dir`.

    `base` is the worker's LoadedBase with no adapter attached; `metrics` the training's
    (eval_loss_before / _after, loss_curve). For `if_better` the reference is the current
    adapter's eval loss on `eval_examples`, or the base's (eval_loss_before) when there is none."""
    out_dir.mkdir(parents=True, exist_ok=True)
    is_adapter = (adapter_dir / ADAPTER_CONFIG_FILE).is_file()
    found: dict[str, Any] = {"promote": policy}

    eval_after = metrics.get("eval_loss_after")
    if policy == "if_better":
        eval_after, reference, against = _if_better_losses(base, adapter_dir, eval_examples, current, metrics, found)
        found["eval_loss_current"] = _finite(reference)
        found["compared_with"] = against
    else:
        reference, against = None, "the base model"
    promote, reason = decide(policy, None if eval_after is None else float(eval_after), reference, against)
    found.update(promoted=promote, promote_reason=reason)

    samples = _samples(base, adapter_dir if is_adapter else None, eval_examples, job_id, sample_prompts, max_new_tokens)
    (out_dir / SAMPLES_FILE).write_text(samples.model_dump_json(by_alias=True, indent=2))
    found["samples"] = len(samples.samples)
    curve = metrics.get("loss_curve") or {"train": [], "eval": []}
    plot_loss_curve(curve, out_dir / LOSS_CURVE_FILE, title=f"job {job_id}")
    return Evaluation(
        promote=promote,
        metrics=found,
        files={SAMPLES_FILE: out_dir / SAMPLES_FILE, LOSS_CURVE_FILE: out_dir / LOSS_CURVE_FILE},
    )


def _if_better_losses(
    base: Any,
    adapter_dir: Path,
    eval_examples: list[TokenizedExample],
    current: CurrentAdapter | None,
    metrics: dict[str, Any],
    found: dict[str, Any],
) -> tuple[float | None, float | None, str]:
    """(the new version's loss, the yardstick's loss, what the yardstick is) for `if_better`:
    the current version on the examples neither trained on, or the base when there is none."""
    eval_after, reference = metrics.get("eval_loss_after"), metrics.get("eval_loss_before")
    if current is None or not eval_examples:
        return eval_after, reference, "the base model"
    examples, note = comparable_examples(eval_examples, metrics, current.metrics)
    found.update(compared_on=len(examples), comparison_note=note)
    if not examples:
        return None, None, f"the current version {current.version} (no example neither version trained on)"
    try:
        if len(examples) != len(eval_examples):
            eval_after = adapter_eval_loss(base, adapter_dir, examples)
        reference = adapter_eval_loss(base, current.adapter_dir, examples)
    except Exception as exc:  # e.g. an adapter of other shapes: the base is the fallback yardstick
        log.exception("evaluating the current version %d failed", current.version)
        detail = f"{type(exc).__name__}"
        return (
            metrics.get("eval_loss_after"),
            metrics.get("eval_loss_before"),
            (f"the base model (the current version {current.version} could not be evaluated: {detail})"),
        )
    return eval_after, reference, f"the current version {current.version}"


def sample_prompts(
    model: Any, examples: list[TokenizedExample], count: int, max_new_tokens: int
) -> tuple[list[HeldOutPrompt], str | None]:
    """The held-out prompts to sample (those that leave room for `max_new_tokens` in the
    model's window) and the note to record when there are fewer than `count`."""
    window = getattr(model.config, "max_position_embeddings", None)
    prompts = held_out_prompts(examples, count, None if window is None else window - max_new_tokens)
    note = None
    if len(prompts) < count:
        note = f"{len(prompts)} of {count} asked: the held-out split has no more prompts that fit the model"
    return prompts, note


def build_samples(
    tokenizer: Any,
    prompts: list[HeldOutPrompt],
    base_texts: list[str],
    tuned_texts: list[str],
    *,
    job_id: str | None,
    max_new_tokens: int,
    note: str | None,
) -> VersionSamples:
    """samples.json's content: each prompt with the base's and the trained model's completions."""
    return VersionSamples(
        job_id=job_id,
        max_new_tokens=max_new_tokens,
        note=note,
        samples=[
            SampleCompletion(
                prompt=tokenizer.decode(p.prompt_ids, skip_special_tokens=False),
                reference=tokenizer.decode(p.reference_ids, skip_special_tokens=True),
                base=b,
                adapter=a,
                prompt_tokens=len(p.prompt_ids),
            )
            for p, b, a in zip(prompts, base_texts, tuned_texts, strict=True)
        ],
    )


def samples_failed(job_id: str | None, max_new_tokens: int, exc: BaseException) -> VersionSamples:
    """Samples are for reading: a failure to generate them is logged and noted, never fatal."""
    if type(exc).__name__ == "OutOfMemoryError":
        torch.cuda.empty_cache()
    log.error("job %s: generating samples failed", job_id, exc_info=exc)
    return VersionSamples(
        job_id=job_id, max_new_tokens=max_new_tokens, note=f"generating samples failed: {type(exc).__name__}"
    )


def _samples(
    base: Any, adapter_dir: Path | None, examples: list[TokenizedExample], job_id: str, count: int, max_new_tokens: int
) -> VersionSamples:
    tokenizer = base.tokenizer
    prompts, note = sample_prompts(base.model, examples, count, max_new_tokens)
    if adapter_dir is None:
        prompts, note = [], "the job did not produce an adapter to sample"
    try:
        base_texts = [greedy_completion(base.model, tokenizer, p.prompt_ids, max_new_tokens) for p in prompts]
        adapter_texts: list[str] = []
        if prompts:
            assert adapter_dir is not None
            with adapter_attached(base, adapter_dir) as model:
                adapter_texts = [greedy_completion(model, tokenizer, p.prompt_ids, max_new_tokens) for p in prompts]
    except Exception as exc:
        return samples_failed(job_id, max_new_tokens, exc)
    return build_samples(
        tokenizer, prompts, base_texts, adapter_texts, job_id=job_id, max_new_tokens=max_new_tokens, note=note
    )
