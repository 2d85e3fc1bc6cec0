"""A saved PEFT adapter judged from its files, without loading it: `adapter_config.json` and the
tensor names in `adapter_model.safetensors` (read from its header) give the `AdapterTraits`
that `contracts.serving` checks against each engine's rules."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from contracts.serving import AdapterTraits, Engine, compatibility, file_violations

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())


def tensor_names(adapter_dir: Path) -> list[str]:
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS_FILE), framework="numpy") as weights:
        return list(weights.keys())


def adapter_traits(adapter_dir: Path, tied_embeddings: bool | None = None) -> AdapterTraits:
    """What the engines judge of the adapter saved in `adapter_dir`; `tied_embeddings`: the
    base's `tie_word_embeddings` (None when unknown)."""
    return AdapterTraits.of_files(adapter_config(adapter_dir), tensor_names(adapter_dir), tied_embeddings)


def serving_verdict(adapter_dir: Path, tied_embeddings: bool | None, max_lora_rank: int) -> dict[str, str]:
    """Every engine's verdict on the saved adapter: `ok` or the rules it breaks."""
    return compatibility(adapter_traits(adapter_dir, tied_embeddings), max_lora_rank)


def unservable(adapter_dir: Path, engines: list[Engine], tied_embeddings: bool | None, max_lora_rank: int) -> str:
    """The rules of `engines` the saved adapter breaks, joined ("" when every one loads it)."""
    broken = file_violations(adapter_traits(adapter_dir, tied_embeddings), engines, max_lora_rank)
    return "; ".join(map(str, broken))
