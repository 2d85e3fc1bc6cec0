"""Merging an adapter into its base model (what fuse jobs do, `trainer.jobs.fuse`).

    a fresh 16-bit base (bfloat16, never the worker's cached, possibly 4-bit, base)
    -> PeftModel.from_pretrained -> merge_and_unload -> save_pretrained (safetensors)
    + the base's tokenizer

The merged model loads with `AutoModelForCausalLM.from_pretrained(dir)` alone and gives the
logits of base + adapter within bf16 rounding.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from trainer.base_model import BaseModelCache

FUSE_DTYPE = torch.bfloat16  # merged in 16-bit: merging into 4-bit weights would throw the adapter's precision away


def merge_adapter(
    models: BaseModelCache, base_model: str, adapter_dir: Path, out_dir: Path, dtype: torch.dtype = FUSE_DTYPE
) -> dict[str, Any]:
    """Merge the PEFT adapter in `adapter_dir` into a fresh 16-bit copy of `base_model` and save
    the result (safetensors weights, config, generation config, tokenizer) to `out_dir`.

    The 16-bit base is loaded for this merge only and freed before returning. Returns facts
    for the job's metrics."""
    from peft import PeftModel

    started = time.monotonic()
    held: dict[str, Any] = {}
    try:
        held["base"] = models.load_16bit(base_model, dtype)
        device = str(next(held["base"].parameters()).device)
        held["peft"] = PeftModel.from_pretrained(held["base"], adapter_dir)
        held["merged"] = held["peft"].merge_and_unload()
        load_merge_seconds = time.monotonic() - started
        held["merged"].save_pretrained(out_dir, safe_serialization=True)
    finally:
        held.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    models.stock_tokenizer(base_model).save_pretrained(out_dir)
    weights = sorted(p.name for p in out_dir.iterdir() if p.suffix == ".safetensors")
    pickled = sorted(p.name for p in out_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if not weights or pickled:
        raise RuntimeError(
            f"the merged model was not saved as safetensors only: {sorted(p.name for p in out_dir.iterdir())}"
        )
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "merge_seconds": round(load_merge_seconds, 3),
        "save_seconds": round(time.monotonic() - started - load_merge_seconds, 3),
        "weight_files": weights,
    }
