"""A preference job's data: the avatar's judgements, split into training and held-out feedback,
and the rows TRL's trainers read.

    judgements (pairs and rated replies) -> the ones the objective can use (dpo: pairs only;
    kto: every rated reply, and both halves of a pair) -> a seeded held-out split (whole
    judgements, so a pair's halves stay together) -> TRL rows (conversational)

KTO's weights default to the balance its paper recommends: thumbs-up replies weighed by
(thumbs-down count / thumbs-up count), so both sides pull equally however the feedback leans.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from contracts.preferences import Judgement
from contracts.spec import Preference
from trainer.dataset import content_key, stable_split
from trainer.errors import JobFailure

PreferenceObjective = Literal["dpo", "kto"]


@dataclass
class PreferenceSet:
    """The judgements a preference job trains on and the ones it holds out."""

    objective: PreferenceObjective
    train: list[Judgement]
    eval: list[Judgement]
    pairs: int  # pairs among the avatar's judgements
    ratings: int  # rated replies among them
    left_out: int  # judgements the objective cannot use (dpo: rated replies)

    def metrics(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "preference_pairs": self.pairs,
            "preference_ratings": self.ratings,
            "preference_left_out": self.left_out,
            "train_examples": len(self.train),
            "eval_examples": len(self.eval),
        }


def preference_set(
    judgements: list[Judgement], objective: PreferenceObjective, eval_fraction: float, seed: int
) -> PreferenceSet:
    """The usable judgements, split (JobFailure when the objective can use none)."""
    pairs = [j for j in judgements if j.kind == "pair"]
    usable = pairs if objective == "dpo" else judgements
    if not usable:
        raise JobFailure(
            f"objective dpo trains on pairs (chosen vs rejected) and the avatar's preference documents hold "
            f"{len(judgements)} rated replies and no pair: post corrections (feedback with chosen and rejected, "
            "or a correction of a generation), or train them with objective kto"
        )
    # Stable across jobs, like the SFT split: the same judgement is held out in every job.
    train, held_out, _ = stable_split(usable, [content_key(j) for j in usable], eval_fraction)
    return PreferenceSet(
        objective=objective,
        train=train,
        eval=held_out,
        pairs=len(pairs),
        ratings=len(judgements) - len(pairs),
        left_out=len(judgements) - len(usable),
    )


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def dpo_rows(judgements: list[Judgement]) -> list[dict[str, Any]]:
    """TRL's conversational preference rows (prompt, chosen, rejected)."""
    return [
        {"prompt": j.prompt_dicts(), "chosen": _assistant(j.chosen or ""), "rejected": _assistant(j.rejected or "")}
        for j in judgements
        if j.kind == "pair"
    ]


def kto_rows(judgements: list[Judgement], seed: int) -> list[dict[str, Any]]:
    """TRL's conversational unpaired rows (prompt, completion, label), in a seeded shuffle: KTO
    estimates its KL term from neighbouring rows, which must not be a pair's two halves."""
    rows = [
        {"prompt": j.prompt_dicts(), "completion": _assistant(reply), "label": label}
        for j in judgements
        for reply, label in j.kto_items()
    ]
    random.Random(seed).shuffle(rows)
    return rows


def kto_weights(judgements: list[Judgement], options: Preference) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): the options', else balanced by the counts."""
    labels = [label for j in judgements for _, label in j.kto_items()]
    desirable, undesirable = labels.count(True), labels.count(False)
    balanced = undesirable / desirable if desirable and undesirable else 1.0
    return (
        options.desirable_weight if options.desirable_weight is not None else round(balanced, 6),
        options.undesirable_weight if options.undesirable_weight is not None else 1.0,
    )
