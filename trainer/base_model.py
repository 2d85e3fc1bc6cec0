"""Loading the base model once and keeping it between jobs.

A worker keeps one base model loaded (per name, revision, method and 4-bit quantisation
config) and reuses it for every job on that base: PEFT injects LoRA layers for a job and
`unload()` removes them again, so the next job starts from the untouched base without
reloading it. A job asking for another quantisation (`quant_type`, `double_quant`,
`compute_dtype`) or another base reloads it.

Fuse jobs and full fine-tuning never touch that cached copy (it may be 4-bit, and they rewrite
weights): `load_private` gives them a private copy in the dtype they ask for, which they free
when done.

A job's base may also be an `s3://bucket/prefix` holding a saved model (`save_pretrained`
output): `fetch_s3_model` downloads it once into MODEL_CACHE_DIR, keyed by the objects' ETags,
and the model is then loaded from that local directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from contracts.s3uri import InvalidS3Uri, S3Uri, parse_s3_uri, within_prefixes, within_user_prefix
from trainer.errors import JobFailure

log = logging.getLogger("avatune.trainer")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantOptions:
    """The 4-bit (bitsandbytes) quantisation of a qlora base; part of the cache key."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None  # None: bfloat16 on CPU or a bf16-capable GPU, else float16

    def resolved(self, device: torch.device) -> QuantOptions:
        if self.compute_dtype is not None:
            return self
        bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
        return QuantOptions(self.quant_type, self.double_quant, "bfloat16" if bf16 else "float16")


@dataclass(frozen=True)
class BaseRef:
    """Which base a job trains on: what `from_pretrained` loads (`path`: a hub id or a local
    directory), its `revision`, the hub `token` (never logged: excluded from repr), and the
    `label` recorded in metrics and manifests (the hub id or the s3:// URI)."""

    path: str
    revision: str | None = None
    token: str | None = field(default=None, repr=False, compare=False)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.path


@dataclass
class LoadedBase:
    name: str
    method: str  # the method the weights were loaded for: "qlora" (4-bit) or "lora"
    model: Any
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    fallback_reason: str | None = None
    quant: QuantOptions | None = None  # the 4-bit config actually used (qlora only)
    revision: str | None = None

    def quant_metrics(self) -> dict[str, Any]:
        return {} if self.quant is None else asdict(self.quant)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_4bit(name: str, common: dict[str, Any], device: torch.device, quant: QuantOptions) -> Any:
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[quant.compute_dtype or "bfloat16"],
    )
    return AutoModelForCausalLM.from_pretrained(
        name,
        quantization_config=config,
        device_map={"": device.index or 0} if device.type == "cuda" else "cpu",
        **common,
    )


class BaseModelCache:
    """Holds at most one loaded base model; `get` reloads only when the name, revision, method or
    quantisation changes."""

    def __init__(self, cache_dir: str | None = None, token: str | None = None) -> None:
        self._cache_dir = cache_dir
        self._token = token
        self._loaded: LoadedBase | None = None
        self._key: tuple[Any, ...] | None = None
        self.loads = 0

    def _common(self, revision: str | None, token: str | None) -> dict[str, Any]:
        common: dict[str, Any] = {"cache_dir": self._cache_dir, "token": token or self._token}
        if revision:
            common["revision"] = revision
        return common

    def get(
        self,
        name: str,
        method: str,
        quant: QuantOptions | None = None,
        *,
        revision: str | None = None,
        token: str | None = None,
    ) -> LoadedBase:
        quant = (quant or QuantOptions()).resolved(_device()) if method == "qlora" else None
        key = (name, revision, method, quant)
        if self._loaded is not None and self._key == key:
            return self._loaded
        self._loaded = None  # drop the old base before loading the next one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._loaded = self._load(name, method, quant, revision, token)
        self._key = key
        self.loads += 1
        return self._loaded

    def tokenizer(self, name: str, *, revision: str | None = None, token: str | None = None) -> PreTrainedTokenizerBase:
        """The base's tokenizer, without loading its weights when they are not loaded already."""
        if self._loaded is not None and self._loaded.name == name and self._loaded.revision == revision:
            return self._loaded.tokenizer
        return self._load_tokenizer(name, revision, token)

    def load_private(
        self, name: str, dtype: torch.dtype, *, revision: str | None = None, token: str | None = None
    ) -> Any:
        """A fresh, uncached copy of the base in `dtype` (never quantised) on this worker's
        device, for rewriting its weights (merging, full fine-tuning); the caller owns it and
        frees it. The cached base is left alone."""
        device = _device()
        placement: dict[str, Any] = {"device_map": {"": device.index or 0}} if device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **self._common(revision, token), **placement)
        log.info("loaded %s (%s, uncached) on %s", name, dtype, device)
        return model

    def load_16bit(
        self, name: str, dtype: torch.dtype = torch.bfloat16, *, revision: str | None = None, token: str | None = None
    ) -> Any:
        """`load_private` in 16-bit: what fuse jobs merge an adapter into."""
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"load_16bit takes a 16-bit dtype, not {dtype}")
        return self.load_private(name, dtype, revision=revision, token=token)

    def stock_tokenizer(
        self, name: str, *, revision: str | None = None, token: str | None = None
    ) -> PreTrainedTokenizerBase:
        """The base's tokenizer exactly as published (no pad token added): what ships with a saved model."""
        return AutoTokenizer.from_pretrained(name, **self._common(revision, token))

    def _load_tokenizer(self, name: str, revision: str | None, token: str | None) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(name, **self._common(revision, token))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load(
        self, name: str, method: str, quant: QuantOptions | None, revision: str | None, token: str | None
    ) -> LoadedBase:
        device = _device()
        common = self._common(revision, token)
        tokenizer = self._load_tokenizer(name, revision, token)
        fallback = None
        if method == "qlora" and quant is not None:
            try:
                model = _load_4bit(name, common, device, quant)
                log.info("loaded %s in 4-bit %s on %s", name, quant.quant_type, device)
                return LoadedBase(name, "qlora", model, tokenizer, device, quant=quant, revision=revision)
            except Exception as exc:  # bitsandbytes missing or unsupported on this machine
                fallback = f"4-bit loading failed ({type(exc).__name__}: {exc}); trained with lora instead"
                log.warning(fallback)
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **common).to(device)
        log.info("loaded %s (%s) on %s", name, dtype, device)
        return LoadedBase(name, "lora", model, tokenizer, device, fallback_reason=fallback, revision=revision)


# -- where a job's base comes from ---------------------------------------------------------


def resolve_base(
    spec_base: Any,
    *,
    default: str,
    user_id: str,
    bucket: str,
    allowed_prefixes: list[str],
    s3: Any,
    cache_dir: str | None,
) -> BaseRef:
    """The base a job asked for (`JobSpec.base_model`, or None) as a loadable `BaseRef`.

    - `token_env` names an environment variable of this worker holding the hub token; a missing
      variable fails the job (the token itself is never stored, logged or put in an error).
    - an `s3://` name must lie in the service bucket under the job's user prefix, or under a
      prefix the operator allows (BASE_MODEL_S3_ALLOWED_PREFIXES); it is downloaded once."""
    name = getattr(spec_base, "name", None) or default
    revision = getattr(spec_base, "revision", None)
    token_env = getattr(spec_base, "token_env", None)
    token = None
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise JobFailure(f"base_model.token_env names {token_env!r}, which is not set on this worker")
    if not name.startswith("s3://"):
        return BaseRef(path=name, revision=revision, token=token, label=name)
    try:
        uri = parse_s3_uri(name, prefix=True)
    except InvalidS3Uri as exc:
        raise JobFailure(f"base_model.name: {exc}") from None
    if not (within_user_prefix(uri, bucket, user_id) or within_prefixes(uri, allowed_prefixes)):
        raise JobFailure(
            f"base_model.name {name!r} is outside your prefix s3://{bucket}/users/{user_id}/ "
            "and the prefixes this trainer allows (BASE_MODEL_S3_ALLOWED_PREFIXES)"
        )
    if revision:
        raise JobFailure("base_model.revision applies to hub models, not to an s3:// base")
    local = fetch_s3_model(s3, uri, Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "avatune-models")
    return BaseRef(path=str(local), label=str(uri))


def fetch_s3_model(s3: Any, uri: S3Uri, cache_root: Path) -> Path:
    """Download the saved model under `uri` into `cache_root/s3/...` once per content (the
    objects' keys and ETags), and return the local directory. A changed model downloads again."""
    objects: list[tuple[str, str]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.key):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(uri.key) :]
            if rel and not rel.endswith("/"):
                objects.append((rel, obj["ETag"]))
    if not any(rel == "config.json" for rel, _ in objects):
        raise JobFailure(f"base_model.name {uri}: no saved model there (no config.json under the prefix)")
    digest = hashlib.sha256(repr(sorted(objects)).encode()).hexdigest()[:32]
    where = hashlib.sha256(str(uri).encode()).hexdigest()[:32]
    target = cache_root / "s3" / where / digest
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        for rel, _ in objects:
            dest = staging / rel
            if not dest.resolve().is_relative_to(staging.resolve()):  # never write outside the cache
                raise JobFailure(f"base_model.name {uri}: unsafe object name {rel!r}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(uri.bucket, uri.key + rel, str(dest))
        (staging / ".complete").write_text(digest)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Older downloads of the same prefix are stale now.
    for old in target.parent.iterdir():
        if old != target and not old.name.startswith(".download-"):
            shutil.rmtree(old, ignore_errors=True)
    log.info("downloaded base model %s (%d files)", uri, len(objects))
    return target
