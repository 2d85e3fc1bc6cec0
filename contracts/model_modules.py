"""Module names a job's `target_modules` may name, for bases the API can judge without loading them.

Pure (no torch): the API rejects a spec naming unknown modules with a 422 before queueing, and
the trainer checks again against the loaded model's real module names (the authority, since a
base from `s3://` or an unknown hub id can have any layout).
"""

from __future__ import annotations

# The linear projections of every Llama-family decoder layer (Llama 2/3, Mistral, Qwen2,
# TinyLlama, the tests' tiny random Llama), plus the output head.
LLAMA_LINEAR_MODULES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    }
)

# Hub id fragments (lower-case) of bases known to use the Llama module layout.
_LLAMA_FAMILY_MARKERS = ("llama", "mistral", "qwen2", "qwen3", "tinyllama", "smollm")


def known_linear_modules(base_model: str | None) -> frozenset[str] | None:
    """The linear module names of `base_model` (a hub id), or None when the API cannot tell
    (an `s3://` base or an unknown family: the trainer then checks against the loaded model).

    `base_model=None` means the trainer's default base, a Llama-family model."""
    if base_model is None:
        return LLAMA_LINEAR_MODULES
    if base_model.startswith("s3://"):
        return None
    lowered = base_model.lower()
    if any(marker in lowered for marker in _LLAMA_FAMILY_MARKERS):
        return LLAMA_LINEAR_MODULES
    return None


def unknown_modules(target_modules: list[str], base_model: str | None) -> list[str]:
    """The names in `target_modules` that `base_model` has no linear module for (empty when
    all are known or the base's layout is not known here). A name matches by its last dotted
    part, as PEFT matches `target_modules` against module-name suffixes."""
    known = known_linear_modules(base_model)
    if known is None:
        return []
    return [name for name in target_modules if name.rsplit(".", 1)[-1] not in known]


# Decoder layer counts of common bases (lower-cased hub id, without an org for matching
# either spelling), so the API can refuse `trainable_layers` past the last layer.
_KNOWN_LAYER_COUNTS = {
    "llama-3.2-1b": 16,
    "llama-3.2-1b-instruct": 16,
    "llama-3.2-3b": 28,
    "llama-3.2-3b-instruct": 28,
    "llama-3.1-8b": 32,
    "llama-3.1-8b-instruct": 32,
    "meta-llama-3.1-8b": 32,
    "meta-llama-3.1-8b-instruct": 32,
    "tinyllama-1.1b-chat-v1.0": 22,
    "mistral-7b-v0.1": 32,
    "mistral-7b-instruct-v0.2": 32,
    "mistral-7b-instruct-v0.3": 32,
}


def known_layer_count(base_model: str | None) -> int | None:
    """The number of decoder layers of `base_model` (a hub id) when the API knows it, else None
    (the trainer's default base, an `s3://` base, an unlisted id: the trainer checks)."""
    if base_model is None or base_model.startswith("s3://"):
        return None
    return _KNOWN_LAYER_COUNTS.get(base_model.rsplit("/", 1)[-1].lower())
