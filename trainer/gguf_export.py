"""PEFT LoRA adapters (and their Llama-architecture base) written as GGUF for llama.cpp.

A small converter on the `gguf` package that follows llama.cpp's own conversion scripts
(`convert_lora_to_gguf.py`, `convert_hf_to_gguf.py` for `LlamaForCausalLM`) for what avatune
trains, so a worker needs neither llama.cpp's sources nor its Python requirements:

- the adapter: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`; each
  PEFT `...{module}.lora_A.weight` / `lora_B.weight` pair becomes `{gguf tensor}.lora_a` /
  `.lora_b` under the base tensor's llama.cpp name (`blk.{i}.attn_q.weight`, ...). llama.cpp's
  Llama graph expects the q and k projections' rows permuted for its RoPE layout (`permute`):
  only `lora_b` carries those rows. What llama.cpp cannot load (`contracts.serving`: DoRA,
  whole weights, lm_head LoRA on tied embeddings) is refused before anything is written;
- the base (`include_base`): the hyper-parameters, the byte-level BPE tokenizer
  (`tokenizer.ggml.model = gpt2`, Llama 3's pre-tokenizer `llama-bpe`, merges and special
  tokens through `gguf.SpecialVocab`), and every weight under its llama.cpp name, q/k permuted.

Tensors are streamed (header and tensor infos first, then one tensor at a time), so a base of
several GB never sits in memory whole. `outtype` f32 or f16 applies to matrices; vectors
(norms) stay f32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from safetensors import safe_open

from contracts.serving import BASE_LAYER_SUFFIX, file_violations
from trainer.adapter_files import ADAPTER_WEIGHTS_FILE, adapter_config, adapter_traits
from trainer.tiny_model import LLAMA3_SPLIT_PATTERN

OutType = Literal["f32", "f16"]
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
_NP_TYPES = {"f32": np.float32, "f16": np.float16}
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


class ExportRefused(Exception):
    """The adapter or base cannot be written as GGUF for llama.cpp; the text says why."""


@dataclass(frozen=True)
class LlamaShape:
    """What the conversion needs of the base's `config.json`."""

    config: dict[str, Any]

    @classmethod
    def of(cls, base_dir: Path) -> LlamaShape:
        config = json.loads((base_dir / "config.json").read_text())
        architectures = config.get("architectures") or []
        if not set(architectures) & set(LLAMA_ARCHITECTURES):
            raise ExportRefused(
                f"GGUF export supports Llama-architecture bases ({', '.join(LLAMA_ARCHITECTURES)}); this base is "
                f"{', '.join(architectures) or config.get('model_type', 'unknown')}: convert it with llama.cpp's "
                "convert_hf_to_gguf.py and export the adapter as peft"
            )
        return cls(config)

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.heads)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.config["hidden_size"] // self.heads)

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def rope(self) -> dict[str, Any]:
        """The RoPE parameters (transformers 5 `rope_parameters`, or 4's `rope_theta` + `rope_scaling`)."""
        params = dict(self.config.get("rope_scaling") or {})
        params.update(self.config.get("rope_parameters") or {})
        params.setdefault("rope_theta", self.config.get("rope_theta", 10000.0))
        return params

    def tensor_name(self, hf_name: str) -> str:
        """The llama.cpp name of a base tensor (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`)."""
        name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.layers).get_name(
            hf_name, try_suffixes=(".weight", ".bias")
        )
        if name is None:
            raise ExportRefused(f"tensor {hf_name!r} has no llama.cpp name in a Llama model")
        return name

    def permute_rows(self, hf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """llama.cpp's row order for the q and k projections (convert_hf_to_gguf's `permute`)."""
        if hf_name.endswith("q_proj.weight"):
            heads = self.heads
        elif hf_name.endswith("k_proj.weight"):
            heads = self.kv_heads
        else:
            return rows
        return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _as_array(tensor: torch.Tensor, outtype: OutType) -> np.ndarray:
    dtype = _NP_TYPES[outtype] if tensor.dim() > 1 else np.float32
    return tensor.to(torch.float32).contiguous().numpy().astype(dtype, copy=False)


def _write(writer: gguf.GGUFWriter, tensors: list[tuple[str, Callable[[], np.ndarray], tuple[int, ...], Any]]) -> None:
    """Write the header, the metadata, the tensor infos, then each tensor as it is produced."""
    for name, _, shape, dtype in tensors:
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, produce, _, _ in tensors:
        writer.write_tensor_data(produce())
    writer.close()


# -- the adapter ---------------------------------------------------------------------------------


def _lora_pairs(names: list[str]) -> dict[str, tuple[str, str]]:
    """Base weight name (without PEFT's prefix) -> its (lora_A, lora_B) tensor names."""
    pairs: dict[str, dict[str, str]] = {}
    for name in names:
        if name.endswith(BASE_LAYER_SUFFIX):  # the base's own weight, saved beside an lm_head LoRA
            continue
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                base = name.removeprefix("base_model.model.").removesuffix(suffix) + ".weight"
                pairs.setdefault(base, {})[part] = name
                break
        else:
            raise ExportRefused(f"tensor {name!r} is not a lora_A or lora_B tensor; llama.cpp converts only those")
    incomplete = [base for base, parts in pairs.items() if len(parts) != 2]
    if incomplete:
        raise ExportRefused(f"LoRA weights without their A or B half: {incomplete[:3]}")
    return {base: (parts["lora_A"], parts["lora_B"]) for base, parts in sorted(pairs.items())}


def _lora_alpha(config: dict[str, Any]) -> float:
    if config.get("alpha_pattern"):
        raise ExportRefused("alpha_pattern: a GGUF adapter carries one lora_alpha for every tensor")
    if config.get("use_rslora"):
        raise ExportRefused("use_rslora: llama.cpp scales every adapter by alpha / rank")
    return float(config["lora_alpha"])


def adapter_to_gguf(adapter_dir: Path, base_dir: Path, out: Path, outtype: OutType = "f32") -> None:
    """Write the PEFT adapter in `adapter_dir` (trained on the base in `base_dir`; only its
    config.json is read) to `out` as a llama.cpp LoRA adapter. ExportRefused when llama.cpp
    cannot load it (nothing is written then)."""
    shape = LlamaShape.of(base_dir)
    traits = adapter_traits(adapter_dir, shape.tied_embeddings)
    broken = file_violations(traits, ["llama_cpp"], traits.rank or 1)  # llama.cpp has no rank limit
    if broken:
        raise ExportRefused("; ".join(map(str, broken)))
    config = adapter_config(adapter_dir)
    alpha = _lora_alpha(config)
    weights = safe_open(str(adapter_dir / ADAPTER_WEIGHTS_FILE), framework="pt")
    pairs = _lora_pairs(list(weights.keys()))
    if not pairs:
        raise ExportRefused("the adapter holds no LoRA weights")

    def produce(tensor_name: str, base_name: str, half: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            tensor = weights.get_tensor(tensor_name)
            return _as_array(shape.permute_rows(base_name, tensor) if half == "b" else tensor, outtype)

        return load

    tensors = []
    for base_name, (a_name, b_name) in pairs.items():
        gguf_name = shape.tensor_name(base_name)
        if gguf_name.startswith("token_embd"):
            raise ExportRefused("LoRA on embed_tokens is not supported by this converter")
        for half, name in (("a", a_name), ("b", b_name)):
            dims = tuple(weights.get_slice(name).get_shape())
            dtype = _NP_TYPES[outtype] if len(dims) > 1 else np.float32
            tensors.append((f"{gguf_name}.lora_{half}", produce(name, base_name, half), dims, dtype))

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_file_type(_FILE_TYPES[outtype])
    _write(writer, tensors)


# -- the base --------------------------------------------------------------------------------------


def _weight_files(base_dir: Path) -> list[Path]:
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise ExportRefused(f"no safetensors weights in {base_dir.name}: GGUF export reads safetensors only")
    return files


def _base_parameters(writer: gguf.GGUFWriter, shape: LlamaShape, outtype: OutType) -> None:
    c = shape.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(shape.layers)
    writer.add_context_length(int(c["max_position_embeddings"]))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(float(shape.rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(c["vocab_size"]))
    writer.add_rope_dimension_count(shape.head_dim)
    if c.get("head_dim") is not None:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_file_type(_FILE_TYPES[outtype])


def _tokenizer(writer: gguf.GGUFWriter, base_dir: Path, vocab_size: int) -> None:
    """The byte-level BPE tokenizer of `tokenizer.json`, as llama.cpp's `_set_vocab_gpt2` writes it."""
    path = base_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportRefused("the base has no tokenizer.json: GGUF export supports byte-level BPE tokenizers only")
    spec = json.loads(path.read_text())
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre or LLAMA3_SPLIT_PATTERN not in _regexes(spec):
        raise ExportRefused(
            "GGUF export supports Llama 3's byte-level BPE tokenizer (its pre-tokenizer split) only: convert "
            "this base with llama.cpp's convert_hf_to_gguf.py and export the adapter alone"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token in added.values():
        vocab[token["content"]] = token["id"]
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(base_dir, load_merges=True).add_to_gguf(writer)


def _regexes(spec: dict[str, Any]) -> list[str]:
    """The split patterns of a tokenizer.json's pre-tokenizer (one, or a Sequence of them)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    return [step["pattern"]["Regex"] for step in steps if "Regex" in (step.get("pattern") or {})]


def _llama3_rope_factors(shape: LlamaShape) -> torch.Tensor | None:
    """`rope_freqs` for Llama 3.1+'s `rope_type: llama3` scaling (convert_hf_to_gguf's LlamaModel)."""
    rope = shape.rope
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    dim = shape.head_dim
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _base_tensors(shape: LlamaShape, files: list[Path], outtype: OutType) -> Iterator[tuple]:
    for path in files:
        handle = safe_open(str(path), framework="pt")
        for name in handle.keys():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and shape.tied_embeddings:
                continue

            def load(handle: Any = handle, name: str = name) -> np.ndarray:
                return _as_array(shape.permute_rows(name, handle.get_tensor(name)), outtype)

            dims = tuple(handle.get_slice(name).get_shape())
            yield shape.tensor_name(name), load, dims, _NP_TYPES[outtype] if len(dims) > 1 else np.float32


def base_to_gguf(base_dir: Path, out: Path, outtype: OutType = "f16") -> None:
    """Write the Llama-architecture base saved in `base_dir` (config.json, tokenizer.json,
    safetensors weights) to `out` as a GGUF model for llama.cpp. ExportRefused for what this
    converter does not handle (another architecture, a SentencePiece tokenizer, ...)."""
    shape = LlamaShape.of(base_dir)
    files = _weight_files(base_dir)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _base_parameters(writer, shape, outtype)
    _tokenizer(writer, base_dir, int(shape.config["vocab_size"]))
    tensors = list(_base_tensors(shape, files, outtype))
    if (factors := _llama3_rope_factors(shape)) is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        tensors.append((name, lambda: factors.numpy(), tuple(factors.shape), np.float32))
    _write(writer, tensors)
