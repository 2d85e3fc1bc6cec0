"""The preference training library in-process, on the real tiny model: the worker's cached base
and tokenizer come back exactly as they were (later jobs share them), a stopped job saves
nothing, and the data rules (dpo needs pairs, kto's balance, the held-out split)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.common import NoControl
from contracts.adapter import DOCUMENTED_DEFAULTS, AdapterSettings
from contracts.documents import ChatMessage
from contracts.preferences import Judgement
from contracts.spec import Preference
from trainer.base_model import BaseModelCache
from trainer.errors import JobFailure
from trainer.preference import train_preference
from trainer.preference_data import kto_rows, kto_weights, preference_set


def judgements(n: int, pairs: bool = True) -> list[Judgement]:
    out = []
    for i in range(n):
        prompt = [ChatMessage(role="user", content=f"question {i}: how are you?")]
        if pairs:
            out.append(Judgement(prompt=prompt, chosen=f"great, thanks {i}", rejected=f"leave me alone {i}"))
        else:
            out.append(
                Judgement(prompt=prompt, chosen=f"great, thanks {i}")
                if i % 3
                else Judgement(prompt=prompt, rejected=f"no {i}")
            )
    return out


CFG = AdapterSettings(method="lora", r=4, num_epochs=1, batch_size=1).merged_over(DOCUMENTED_DEFAULTS)


def test_the_cached_base_and_tokenizer_come_back_untouched(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = BaseModelCache().get(str(tiny_model_dir), "lora")
    base.tokenizer.pad_token = None  # a base without a pad token: TRL sets one for itself
    config_pad = base.model.config.pad_token_id
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    ids = base.tokenizer("question 1: how are you?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = base.model(ids).logits
    for objective in ("dpo", "kto"):
        data = preference_set(judgements(8, pairs=objective == "dpo"), objective, 0.25, 0)
        outcome = train_preference(
            base, CFG, Preference(learning_rate=1e-3).resolved(), data, tmp_path / objective, NoControl()
        )
        assert outcome.completed and (outcome.adapter_dir / "adapter_model.safetensors").is_file()
        assert not (outcome.adapter_dir / "ref").exists()  # only the trained adapter, not TRL's reference copy
        if objective == "kto":
            assert outcome.metrics.as_dict()["batch_size_note"].startswith("kto needs 2")
    assert type(base.model).__name__ == "LlamaForCausalLM" and not hasattr(base.model, "peft_config")
    assert "forward" not in base.model.__dict__  # TRL's fused LM head is gone again
    assert base.tokenizer.pad_token is None and base.model.config.pad_token_id == config_pad
    assert all(torch.equal(weights[k], v) for k, v in base.model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(base.model(ids).logits, logits)


def test_a_stopped_preference_job_saves_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    class Cancelled(NoControl):
        def stop_reason(self) -> str:
            return "cancelled"

    base = BaseModelCache().get(str(tiny_model_dir), "lora")
    data = preference_set(judgements(8), "dpo", 0.25, 0)
    outcome = train_preference(base, CFG, Preference().resolved(), data, tmp_path, Cancelled())
    assert not outcome.completed and outcome.stop_reason == "cancelled" and not (tmp_path / "adapter").exists()
    assert not hasattr(base.model, "peft_config")


def test_dpo_needs_pairs_and_kto_takes_everything() -> None:
    ratings = judgements(6, pairs=False)
    with pytest.raises(JobFailure, match="objective dpo trains on pairs.*objective kto"):
        preference_set(ratings, "dpo", 0.1, 0)
    mixed = judgements(4) + ratings
    dpo = preference_set(mixed, "dpo", 0.25, 0)
    assert (dpo.pairs, dpo.ratings, dpo.left_out, len(dpo.train) + len(dpo.eval)) == (4, 6, 6, 4)
    kto = preference_set(mixed, "kto", 0.25, 0)
    assert kto.left_out == 0 and len(kto.train) + len(kto.eval) == 10
    rows = kto_rows(mixed, seed=0)
    assert len(rows) == 14 and sum(r["label"] for r in rows) == 4 + 4  # both halves of each pair, 4 ups
    # Balanced: ups weigh (downs / ups); the options win when set.
    assert kto_weights(mixed, Preference()) == (6 / 8, 1.0)
    assert kto_weights(mixed, Preference(desirable_weight=2.0, undesirable_weight=0.5)) == (2.0, 0.5)
