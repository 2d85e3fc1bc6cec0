"""What the engines that serve adapters can load: each engine's rules as data, and one checker.

avatune trains off the inference endpoint so that the endpoint can pick the result up; an
adapter the endpoint cannot load is a broken avatar even though its job succeeded. The
operator names what it serves with (`SERVING_TARGETS`, `SERVING_MAX_LORA_RANK`: read by the
API and the trainer alike, `ServingProfile`), and this module judges an adapter against it:

- `settings_violations`: the settings of `PUT {base}/adapter` and of a train job (API body and
  queue request alike, checked again by the trainer on the resolved configuration) that would
  produce an adapter a target cannot load. Each `Violation` names the field and the engine's rule;
- `file_violations` / `compatibility`: a saved adapter (`adapter_config.json` and the tensor
  names of `adapter_model.safetensors`, as `AdapterTraits.of_files`) against every engine; the
  trainer records the verdict per engine (`ok`, or the reasons) in each published version's
  metrics and manifest (`serving`), and a GGUF export refuses what llama.cpp cannot load.

The rules come from the engines' own loader code (read, not guessed):

- vLLM, `vllm/lora/peft_helper.py` (`PEFTHelper.validate_legal`: the rank, including
  `rank_pattern`, at most `--max-lora-rank`, whose allowed values are `VLLM_MAX_LORA_RANKS`;
  no DoRA; `modules_to_save` only for classification heads; bias `none`) and
  `vllm/lora/lora_model.py` (`LoRAModel.from_local_checkpoint`: any tensor that is not a
  `lora_A`/`lora_B`/`lora_embedding_A`/`lora_embedding_B` is "an unsupported LoRA weight",
  such as a whole `embed_tokens` or `lm_head` saved after tokens were added);
- llama.cpp, `convert_lora_to_gguf.py` (how its adapters are made): only `lora_A`/`lora_B`
  tensors convert; DoRA's `lora_magnitude_vector`s and whole weights (`modules_to_save`, an
  `embed_tokens`/`lm_head` saved after adding tokens) stop the conversion, and LoRA on
  `lm_head` is refused for a base whose output shares the token embeddings. It has no rank limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from contracts.adapter import AdapterSettings

Engine = Literal["vllm", "llama_cpp"]
ENGINES: tuple[Engine, ...] = get_args(Engine)
# vLLM's `--max-lora-rank` accepts only these (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16

# What an adapter may have that some engine refuses.
Feature = Literal["rank", "dora", "modules_to_save", "whole_weights", "tied_lm_head_lora"]

# The suffixes of the tensors every engine loads as LoRA weights (PEFT's names).
LORA_TENSOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
DORA_TENSOR_SUFFIX = ".lora_magnitude_vector"
# PEFT saves the base weight of an embedding-like LoRA target (lm_head) beside it; both engines skip it.
BASE_LAYER_SUFFIX = ".base_layer.weight"


@dataclass(frozen=True)
class EngineRules:
    """One engine: its name, where its rules come from, what it refuses (feature -> its rule in
    words, `{max_lora_rank}` filled in), and how a running server picks up a new version."""

    name: str
    source: str
    refuses: dict[Feature, str]
    swap: str


ENGINE_RULES: dict[Engine, EngineRules] = {
    "vllm": EngineRules(
        name="vLLM",
        source="vllm/lora/peft_helper.py (PEFTHelper.validate_legal), vllm/lora/lora_model.py",
        refuses={
            "rank": "loads adapters of rank at most max_lora_rank ({max_lora_rank}, SERVING_MAX_LORA_RANK)",
            "dora": "does not support DoRA (use_dora)",
            "modules_to_save": "supports modules_to_save only for classification heads (classifier, score)",
            "whole_weights": "loads only LoRA tensors (lora_A, lora_B): a whole weight such as embed_tokens "
            "or lm_head (saved after adding tokens) is an unsupported LoRA weight",
        },
        swap="hot-swaps: POST /v1/load_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
    ),
    "llama_cpp": EngineRules(
        name="llama.cpp",
        source="convert_lora_to_gguf.py",
        refuses={
            "dora": "converts only lora_A and lora_B tensors: DoRA's magnitude vectors (use_dora) stop the "
            "conversion to GGUF",
            "modules_to_save": "converts only lora_A and lora_B tensors: modules_to_save stores whole weights, "
            "which stop the conversion to GGUF",
            "whole_weights": "converts only lora_A and lora_B tensors: whole embed_tokens or lm_head weights "
            "(saved after adding tokens) stop the conversion to GGUF",
            "tied_lm_head_lora": "refuses LoRA on lm_head when the base's output shares the token embeddings "
            "(tie_word_embeddings)",
        },
        swap="needs a restart to load a new adapter file; adapters loaded at start (--lora) are switched "
        "with POST /lora-adapters (scales)",
    ),
}
assert set(ENGINE_RULES) == set(ENGINES)


class ServingProfile(BaseModel):
    """What the operator serves adapters with: `SERVING_TARGETS` (comma-separated engines;
    empty: no engine's rules are enforced, compatibility is still recorded) and
    `SERVING_MAX_LORA_RANK` (vLLM's `--max-lora-rank`)."""

    model_config = ConfigDict(frozen=True)

    targets: tuple[Engine, ...] = ()
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_MAX_LORA_RANKS:
            raise ValueError(
                f"SERVING_MAX_LORA_RANK must be one of vLLM's --max-lora-rank values "
                f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}; got {value}"
            )
        return value

    @classmethod
    def parse(cls, targets: str, max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> ServingProfile:
        """From the settings' text form, e.g. `"vllm,llama_cpp"`; ValueError naming an unknown engine."""
        names = [t.strip().lower().replace("-", "_").replace(".", "_") for t in targets.split(",") if t.strip()]
        unknown = [n for n in names if n not in ENGINES]
        if unknown:
            raise ValueError(
                f"SERVING_TARGETS names unknown engines {unknown}; known: {', '.join(ENGINES)} (comma-separated)"
            )
        return cls(targets=tuple(dict.fromkeys(names)), max_lora_rank=max_lora_rank)  # type: ignore[arg-type]


class ServingSettings(BaseModel):
    """The serving settings both the API's and the trainer's settings carry (mixed into their
    pydantic-settings classes, so both read the same variables and refuse the same values)."""

    serving_targets: str = Field(default="", alias="SERVING_TARGETS")
    serving_max_lora_rank: int = Field(default=DEFAULT_MAX_LORA_RANK, alias="SERVING_MAX_LORA_RANK")

    @model_validator(mode="after")
    def _valid_profile(self) -> ServingSettings:
        self.serving_profile()  # a bad value stops the process at start, naming the variable
        return self

    def serving_profile(self) -> ServingProfile:
        return ServingProfile.parse(self.serving_targets, self.serving_max_lora_rank)


@dataclass(frozen=True)
class Violation:
    """An engine that cannot load the adapter: the field that causes it and the engine's rule."""

    engine: Engine
    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {ENGINE_RULES[self.engine].name} {self.rule}"


class AdapterTraits(BaseModel):
    """What of an adapter the engines judge, from its settings or from its saved files."""

    rank: int | None = Field(default=None, description="the largest LoRA rank (r and rank_pattern)")
    dora: bool = False
    modules_to_save: list[str] = Field(default_factory=list)
    whole_weights: list[str] = Field(default_factory=list, description="tensors that are not LoRA tensors")
    lm_head_lora: bool = False
    tied_embeddings: bool | None = Field(default=None, description="the base's tie_word_embeddings, if known")

    @classmethod
    def of_settings(cls, cfg: AdapterSettings) -> AdapterTraits:
        return cls(
            rank=cfg.r,
            dora=bool(cfg.use_dora),
            modules_to_save=list(cfg.modules_to_save or []),
            lm_head_lora="lm_head" in (cfg.target_modules or []),
        )

    @classmethod
    def of_files(
        cls, adapter_config: dict[str, Any], tensor_names: Iterable[str], tied_embeddings: bool | None = None
    ) -> AdapterTraits:
        """From `adapter_config.json` (as a dict) and the tensor names of `adapter_model.safetensors`."""
        names = list(tensor_names)
        ranks = [int(adapter_config.get("r") or 0), *map(int, (adapter_config.get("rank_pattern") or {}).values())]
        return cls(
            rank=max(ranks) or None,
            dora=bool(adapter_config.get("use_dora")) or any(n.endswith(DORA_TENSOR_SUFFIX) for n in names),
            modules_to_save=[
                m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")
            ],
            whole_weights=sorted(
                n for n in names if not n.endswith((*LORA_TENSOR_SUFFIXES, DORA_TENSOR_SUFFIX, BASE_LAYER_SUFFIX))
            ),
            lm_head_lora=any(".lm_head.lora_" in n for n in names),
            tied_embeddings=tied_embeddings,
        )

    def features(self, max_lora_rank: int) -> list[Feature]:
        """What of this adapter an engine may refuse (the rank only when above `max_lora_rank`)."""
        found: list[Feature] = []
        if self.rank is not None and self.rank > max_lora_rank:
            found.append("rank")
        if self.dora:
            found.append("dora")
        if self.modules_to_save:
            found.append("modules_to_save")
        if self.whole_weights:
            found.append("whole_weights")
        if self.lm_head_lora and self.tied_embeddings:
            found.append("tied_lm_head_lora")
        return found


# The field a violation names, per feature: in a configuration / in the saved files.
SETTINGS_FIELDS: dict[Feature, str] = {
    "rank": "r",
    "dora": "use_dora",
    "modules_to_save": "modules_to_save",
    "whole_weights": "modules_to_save",
    "tied_lm_head_lora": "target_modules",
}
FILE_FIELDS: dict[Feature, str] = {
    "rank": "adapter_config.json r",
    "dora": "adapter_config.json use_dora",
    "modules_to_save": "adapter_config.json modules_to_save",
    "whole_weights": "adapter_model.safetensors",
    "tied_lm_head_lora": "adapter_config.json target_modules",
}


def violations(
    traits: AdapterTraits, engines: Iterable[Engine], max_lora_rank: int, fields: dict[Feature, str]
) -> list[Violation]:
    """Every rule of `engines` that an adapter with `traits` breaks, naming `fields[feature]`."""
    found = traits.features(max_lora_rank)
    return [
        Violation(engine, fields[feature], rule.format(max_lora_rank=max_lora_rank))
        for engine in engines
        for feature, rule in ENGINE_RULES[engine].refuses.items()
        if feature in found
    ]


def settings_violations(cfg: AdapterSettings, profile: ServingProfile) -> list[Violation]:
    """The settings of `cfg` (only those it sets) that would give an adapter one of the
    profile's targets cannot load. `method: full` publishes a whole model, not an adapter."""
    if cfg.method == "full":
        return []
    return violations(AdapterTraits.of_settings(cfg), profile.targets, profile.max_lora_rank, SETTINGS_FIELDS)


def file_violations(traits: AdapterTraits, engines: Iterable[Engine], max_lora_rank: int) -> list[Violation]:
    """The rules of `engines` that a saved adapter (`AdapterTraits.of_files`) breaks."""
    return violations(traits, engines, max_lora_rank, FILE_FIELDS)


def compatibility(traits: AdapterTraits, max_lora_rank: int) -> dict[str, str]:
    """Every engine's verdict on a saved adapter: `"ok"`, or its broken rules joined by "; "."""
    verdict: dict[str, str] = {}
    for engine in ENGINES:
        broken = file_violations(traits, [engine], max_lora_rank)
        verdict[engine] = "; ".join(str(v) for v in broken) if broken else "ok"
    return verdict
