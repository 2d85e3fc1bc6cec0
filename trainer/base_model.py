"""Loading the base model once and keeping it between jobs.

A worker keeps one base model loaded (per name and quantisation) and reuses it for every
job on that base: PEFT injects LoRA layers for a job and `unload()` removes them again, so
the next job starts from the untouched base without reloading it.

Fuse jobs never touch that cached copy (it may be 4-bit, and merging rewrites weights):
`load_16bit` gives them a private 16-bit copy, which they free when done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("avatune.trainer")


@dataclass
class LoadedBase:
    name: str
    method: str  # the method the weights were loaded for: "qlora" (4-bit) or "lora"
    model: Any
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    fallback_reason: str | None = None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_4bit(name: str, common: dict[str, Any], device: torch.device) -> Any:
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        name, quantization_config=quant, device_map={"": device.index or 0} if device.type == "cuda" else "cpu",
        **common,
    )


class BaseModelCache:
    """Holds at most one loaded base model; `get` reloads only when the name or method changes."""

    def __init__(self, cache_dir: str | None = None, token: str | None = None) -> None:
        self._cache_dir = cache_dir
        self._token = token
        self._loaded: LoadedBase | None = None
        self._key: tuple[str, str] | None = None
        self.loads = 0

    def get(self, name: str, method: str) -> LoadedBase:
        if self._loaded is not None and self._key == (name, method):
            return self._loaded
        self._loaded = None  # drop the old base before loading the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._loaded = self._load(name, method)
        self._key = (name, method)
        self.loads += 1
        return self._loaded

    def tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        """The base's tokenizer, without loading its weights when they are not loaded already."""
        if self._loaded is not None and self._loaded.name == name:
            return self._loaded.tokenizer
        return self._load_tokenizer(name)

    def load_16bit(self, name: str, dtype: torch.dtype = torch.bfloat16) -> Any:
        """A fresh, uncached copy of the base in 16-bit (never quantised) on this worker's device,
        for merging an adapter into; the caller owns it and frees it."""
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"load_16bit takes a 16-bit dtype, not {dtype}")
        device = _device()
        placement: dict[str, Any] = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, cache_dir=self._cache_dir, token=self._token, **placement
        )
        log.info("loaded %s (%s, uncached) on %s", name, dtype, device)
        return model

    def stock_tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        """The base's tokenizer exactly as published (no pad token added): what ships with a merged model."""
        return AutoTokenizer.from_pretrained(name, cache_dir=self._cache_dir, token=self._token)

    def _load_tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=self._cache_dir, token=self._token)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load(self, name: str, method: str) -> LoadedBase:
        device = _device()
        common: dict[str, Any] = {"cache_dir": self._cache_dir, "token": self._token}
        tokenizer = self._load_tokenizer(name)
        fallback = None
        if method == "qlora":
            try:
                model = _load_4bit(name, common, device)
                log.info("loaded %s in 4-bit NF4 on %s", name, device)
                return LoadedBase(name, "qlora", model, tokenizer, device)
            except Exception as exc:  # bitsandbytes missing or unsupported on this machine
                fallback = f"4-bit loading failed ({type(exc).__name__}: {exc}); trained with lora instead"
                log.warning(fallback)
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **common).to(device)
        log.info("loaded %s (%s) on %s", name, dtype, device)
        return LoadedBase(name, "lora", model, tokenizer, device, fallback_reason=fallback)
