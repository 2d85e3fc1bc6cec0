"""Throughput changes to training (trainer/training.py) change no result: packed attention
(causal SDPA per example of a padding-free row) equals the stock masked SDPA path and separate
forward passes, in values and in gradients; the benchmark scripts run (tiny sizes)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from trainer import packed_attention, training


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_layers=2, num_heads=4)


def _model(model_dir: Path, implementation: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if implementation != "sdpa":
        model.set_attn_implementation(implementation)
    return model


def _packed(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions


def test_packed_attention_equals_masked_sdpa_and_separate_passes(model_dir: Path) -> None:
    lengths = [7, 19, 1, 12, 30]
    ids, positions = _packed(lengths)
    stock, packed = _model(model_dir, "sdpa"), _model(model_dir, packed_attention.PACKED_SDPA)
    with torch.no_grad():
        masked = stock(input_ids=ids, position_ids=positions).logits
        ours = packed(input_ids=ids, position_ids=positions).logits
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()[:-1]]
        separate = torch.cat([stock(input_ids=ids[:, s : s + n]).logits for s, n in zip(starts, lengths)], dim=1)
    torch.testing.assert_close(ours, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, separate, rtol=1e-4, atol=1e-4)


def test_packed_attention_gradients_match(model_dir: Path) -> None:
    ids, positions = _packed([11, 5, 23], seed=1)
    labels = ids.clone()
    labels[0, [0, 11, 16]] = -100  # no loss across example boundaries
    grads = []
    for implementation in ("sdpa", packed_attention.PACKED_SDPA):
        model = _model(model_dir, implementation)
        model(input_ids=ids, position_ids=positions, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_padded_batches_and_single_sequences_take_the_stock_path(model_dir: Path) -> None:
    stock, packed = _model(model_dir, "sdpa"), _model(model_dir, packed_attention.PACKED_SDPA)
    ids = torch.randint(0, 500, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=ids, attention_mask=mask).logits[mask.bool()],
            stock(input_ids=ids, attention_mask=mask).logits[mask.bool()],
            rtol=1e-4,
            atol=1e-4,
        )
        torch.testing.assert_close(
            packed(input_ids=ids[:1]).logits, stock(input_ids=ids[:1]).logits, rtol=1e-4, atol=1e-4
        )


def test_train_adapter_uses_packed_attention_and_restores_the_base(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from bench.throughput import synthetic_chats
    from contracts.adapter import AdapterSettings
    from trainer.base_model import LoadedBase
    from trainer.dataset import build_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = build_examples(tokenizer, synthetic_chats(12, seed=3), 128)
    model = _model(model_dir, "sdpa")
    before = copy.deepcopy(model.state_dict())
    seen = []
    real = packed_attention.packed_sdpa_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("position_ids") is not None)
        return real(*args, **kwargs)

    class Quiet:
        def stop_reason(self):
            return None

        def report(self, progress):
            pass

        def checkpoint_due(self, step):
            return False

        def checkpoint_saved(self, local_dir, step):
            pass

    from transformers import AttentionInterface

    AttentionInterface.register(packed_attention.PACKED_SDPA, spy)
    try:
        base = LoadedBase(str(model_dir), "lora", model, tokenizer, torch.device("cpu"))
        cfg = AdapterSettings(
            method="lora",
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            learning_rate=1e-3,
            num_epochs=1,
            batch_size=4,
            max_seq_length=128,
            warmup_ratio=0.0,
            seed=0,
        )
        outcome = training.train_adapter(base, cfg, examples[:8], examples[8:], tmp_path, Quiet())
    finally:
        AttentionInterface.register(packed_attention.PACKED_SDPA, real)
    assert outcome.completed and seen and all(seen)
    assert base.model.config._attn_implementation == "sdpa"
    after = base.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gpu_benchmark_skips_cleanly_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import gpu_train

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real benchmark")
    assert gpu_train.main([]) == 0
    assert "skipped" in capsys.readouterr().out


def test_gpu_benchmark_code_path_runs_on_a_tiny_cpu_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import gpu_train

    assert gpu_train.main(["--smoke", "--scratch", str(tmp_path), "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| lora | **ours** |" in out and "| lora | baseline |" in out


def test_gpu_benchmark_counts_llama_1b_matmul_parameters() -> None:
    import json

    from transformers import LlamaConfig

    from bench.gpu_train import CONFIG, _param_count, matmul_params

    config = LlamaConfig.from_dict(json.loads(CONFIG.read_text()))
    assert round(_param_count(config) / 1e9, 2) == 1.24  # Llama 3.2 1B: 1.24B parameters (tied embeddings)
    assert matmul_params(config) > _param_count(config) - config.vocab_size * config.hidden_size


def test_benchmark_3_runs_end_to_end_at_a_tiny_size() -> None:
    """Every variant of benchmark 3 trains and the section renders (what the run did, no
    timings): `make bench` must not be the first place a change to the training path breaks it."""
    from bench import throughput

    result = throughput.run(n_train=4, n_eval=2, log=lambda *_: None)
    results = result["results"]
    assert set(results) == {"ours", "ours_masked", "handwritten", "pad_to_longest", "pad_to_max", "trl_bfd"}
    assert all(r.steps > 0 for r in results.values())
    assert results["ours"].eval_loss == results["ours"].eval_loss  # a number, not NaN: eval ran
    assert "## 3. Training throughput" in throughput.markdown(result, "python -m bench --only 3")
