"""Benchmark 5: LoRA / QLoRA training throughput on a CUDA GPU, Llama-3.2-1B architecture.

    python -m bench.gpu_train                 # qlora and lora, ours vs baseline; writes BENCHMARKS.md section 5
    python -m bench.gpu_train --methods lora --steps 50 --no-liger

The model is `bench/configs/llama-3.2-1b.json` (Llama 3.2 1B's published architecture) with
random weights, written to a scratch folder once and loaded the way the worker loads a base
(`trainer.base_model`: 4-bit NF4 with double quantisation and bf16 compute for qlora, bf16 for
lora). Data: synthetic chats (`bench.throughput.synthetic_chats`, skewed turn lengths)
tokenized by the trainer's pipeline, truncated at `--seq-len` (2048).

- **ours**: examples packed best-fit-decreasing into rows of `--seq-len` tokens
  (`trainer.dataset.pack_examples`), fed padding-free (`collate_padding_free`: no padding, no
  attention mask, example boundaries in `position_ids`), FlashAttention-2 when `flash_attn`
  is installed (else SDPA run per example, `trainer.training.PACKED_SDPA`, as the worker
  does), Liger kernels when `liger_kernel` is installed (dropped if they fail), bf16, no
  gradient checkpointing (turned on only if a step runs out of memory).
- **baseline**: plain PEFT + `transformers.Trainer`: the same examples, 4 per batch padded to
  the longest with an attention mask, SDPA, bf16, and for qlora PEFT's
  `prepare_model_for_kbit_training` defaults (gradient checkpointing on), as most QLoRA
  recipes run.

Each run trains `--warmup` steps untimed, then `--steps` timed steps; tokens/s counts real
(non-padding) tokens. MFU = real tokens/s × 4 × N / peak bf16 dense FLOP/s, where N counts
the parameters of every matmul (all linear layers including the tied LM head, not the
embedding lookup): forward 2N + backward activation gradients 2N for a frozen base (LoRA's
own weight gradients and attention's score FLOPs are left out, so MFU is understated). Peak
FLOP/s comes from the GPU's name (`--peak-tflops` overrides).

Each flag defaults on when CUDA is present (`--no-...` turns it off). Without CUDA the script
says so and exits 0 (`--smoke` runs a tiny model on the CPU instead, to check the code path).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parent / "configs" / "llama-3.2-1b.json"

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
]


@dataclass
class RunResult:
    method: str
    variant: str
    tokens_per_second: float = 0.0
    step_seconds: float = 0.0
    peak_memory_gib: float = 0.0
    mfu: float = 0.0
    padding_efficiency: float = 0.0
    loss: float = float("nan")
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


def matmul_params(config: Any) -> int:
    """Parameters that take part in a matmul per token: every linear layer and the LM head."""
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = h * config.num_attention_heads * head_dim
    kv = 2 * h * config.num_key_value_heads * head_dim
    o = config.num_attention_heads * head_dim * h
    mlp = 3 * h * i
    return L * (q + kv + o + mlp) + h * config.vocab_size


def _write_model(config_path: Path, out: Path, tokenizer: Any, tiny: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict(json.loads(config_path.read_text()))
    if tiny:
        config = LlamaConfig(
            vocab_size=config.vocab_size if config.vocab_size < 1024 else 512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    return out


def _examples(tokenizer: Any, seq_len: int, n_tokens: int) -> list[Any]:
    from bench.throughput import synthetic_chats
    from trainer.dataset import build_examples

    examples: list[Any] = []
    seed = 1
    while sum(len(e) for e in examples) < n_tokens:
        batch, _ = build_examples(tokenizer, synthetic_chats(200, seed), seq_len)
        examples += batch
        seed += 1
    return examples


class _Counter:
    def __init__(self, collate: Any) -> None:
        self.collate = collate
        self.real: list[int] = []
        self.processed: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else ids.numel())
        self.processed.append(ids.numel())
        return batch


def _pad_to_longest(pad_id: int) -> Any:
    import torch

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), pad_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for k, f in enumerate(features):
            n = len(f["input_ids"])
            ids[k, :n] = torch.tensor(f["input_ids"])
            labels[k, :n] = torch.tensor(f["labels"])
            mask[k, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def _attention(ours: bool, cuda: bool, asked: str) -> str:
    """The attention implementation a run uses: the baseline stays on SDPA."""
    if ours and cuda and asked == "auto" and _installed("flash_attn"):
        return "flash_attention_2"
    if ours and asked != "auto":
        return asked
    return "sdpa"


def run_one(
    model_dir: Path, method: str, variant: str, examples: list[Any], args: argparse.Namespace, device: str
) -> RunResult:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from contracts.adapter import AdapterSettings
    from trainer.dataset import collate_padding_free, pack_examples
    from trainer.training import lora_config

    ours = variant == "ours"
    cuda = device == "cuda"
    bf16 = cuda and args.bf16 and torch.cuda.is_bf16_supported()
    attn = _attention(ours, cuda, args.attn)
    liger = ours and cuda and args.liger and _installed("liger_kernel")
    settings: dict[str, Any] = {
        "attention": attn,
        "bf16": bf16,
        "liger": liger,
        "padding_free": ours and args.padding_free,
    }
    result = RunResult(method, variant, settings=settings)
    common: dict[str, Any] = {"attn_implementation": attn}
    if method == "qlora":
        common["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
        )
        common["device_map"] = {"": 0}
    else:
        common["dtype"] = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, **common)
    if method != "qlora":
        model = model.to(device)
    model.config.use_cache = False
    if ours and args.padding_free and attn == "sdpa":
        from trainer.packed_attention import PACKED_SDPA

        model.set_attn_implementation(PACKED_SDPA)  # what the trainer does on SDPA: causal SDPA per example
        settings["attention"] = "sdpa per example (trainer.training.PACKED_SDPA)"
    grad_ckpt = bool(args.gradient_checkpointing)
    if method == "qlora":
        # Ours: no gradient checkpointing where memory allows; the baseline keeps PEFT's default (on).
        grad_ckpt = grad_ckpt if ours else True
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    cfg = AdapterSettings(method=method, r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=2e-4, seed=0)  # type: ignore[arg-type]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(cfg))
    if ours and args.padding_free:
        rows = pack_examples(examples, args.seq_len)
        dataset = [
            {"input_ids": r["input_ids"], "labels": r["labels"], "position_ids": r["position_ids"]} for r in rows
        ]
        collator = _Counter(collate_padding_free)
        per_device = args.rows_per_step
    else:
        dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        collator = _Counter(_pad_to_longest(0))
        per_device = args.baseline_batch
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    total_steps = args.warmup + args.steps
    targs = TrainingArguments(
        output_dir=str(Path(args.scratch) / f"{method}-{variant}"),
        per_device_train_batch_size=per_device,
        max_steps=total_steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        bf16=bf16,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        gradient_checkpointing=grad_ckpt and method != "qlora",
        use_liger_kernel=liger,
    )
    trainer = Trainer(
        model=peft_model,
        args=targs,
        train_dataset=dataset,
        data_collator=collator,  # type: ignore[arg-type]
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        out = trainer.train()
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        result.error = f"out of memory ({exc.__class__.__name__})"
        return result
    except Exception as exc:  # reported in the table (and retried without Liger when it was on)
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return result
    steps = times[args.warmup :]
    seconds = times[-1] - times[args.warmup - 1] if args.warmup else times[-1] - times[0]
    timed_real = sum(collator.real[args.warmup : total_steps])
    timed_processed = sum(collator.processed[args.warmup : total_steps])
    result.tokens_per_second = timed_real / seconds if seconds > 0 else 0.0
    result.step_seconds = seconds / max(1, len(steps))
    result.padding_efficiency = timed_real / timed_processed if timed_processed else 0.0
    result.loss = float(out.training_loss)
    result.settings["gradient_checkpointing"] = grad_ckpt
    result.settings["batch"] = (
        f"{per_device} packed row(s) of {args.seq_len}" if ours and args.padding_free else f"{per_device} examples"
    )
    if cuda:
        result.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
        if peak:
            result.mfu = result.tokens_per_second * 4 * matmul_params(peft_model.config) / (peak * 1e12)
    del trainer, peft_model, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def markdown(results: list[RunResult], info: dict[str, Any], command_line: str) -> str:
    from bench.common import table

    rows = []
    for r in results:
        if r.error:
            rows.append([r.method, r.variant, r.error, "", "", "", "", "", json.dumps(r.settings)])
            continue
        rows.append(
            [
                r.method,
                f"**{r.variant}**" if r.variant == "ours" else r.variant,
                f"{r.tokens_per_second:,.0f}",
                f"{r.padding_efficiency:.3f}",
                f"{r.peak_memory_gib:.1f} GiB",
                f"{r.mfu * 100:.1f}%",
                f"{r.step_seconds:.3f} s",
                f"{r.loss:.3f}",
                ", ".join(f"{k}={v}" for k, v in r.settings.items()),
            ]
        )
    by = {(r.method, r.variant): r for r in results if not r.error}
    ratios = []
    for method in ("qlora", "lora"):
        if (method, "ours") in by and (method, "baseline") in by:
            ratios.append(
                f"{method}: ours "
                f"{by[(method, 'ours')].tokens_per_second / by[(method, 'baseline')].tokens_per_second:.2f}× "
                "the baseline's tokens/s"
            )
    return "\n".join(
        [
            "## 5. GPU training throughput (Llama-3.2-1B architecture)",
            "",
            f"`bench/configs/llama-3.2-1b.json` with random weights ({info['params'] / 1e9:.2f}B parameters, "
            f"{info['matmul_params'] / 1e9:.2f}B in matmuls), packed synthetic chats at sequence length "
            f"{info['seq_len']}, "
            f"LoRA r=16 on every linear layer; {info['warmup']} warm-up + {info['steps']} timed steps per run. "
            f"MFU = tokens/s × 4 × {info['matmul_params'] / 1e9:.2f}B / {info['peak_tflops']} TFLOP/s "
            "(forward 2N + backward activation gradients 2N, frozen base; attention scores and LoRA weight "
            "gradients not "
            "counted). See `bench/gpu_train.py` for what each variant turns on.",
            "",
            table(
                [
                    "method",
                    "variant",
                    "real tokens/s",
                    "padding efficiency",
                    "peak memory",
                    "MFU",
                    "step",
                    "loss",
                    "settings",
                ],
                rows,
            ),
            "",
            "- " + ("; ".join(ratios) if ratios else "no complete pair of runs") + ".",
            "",
            f"Machine: {info['device']}, torch {info['torch']}, transformers {info['transformers']}. Date: "
            f"{info['date']}. "
            f"Reproduce: `{command_line}`.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="qlora,lora")
    p.add_argument("--variants", default="ours,baseline")
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rows-per-step", type=int, default=2, help="ours: packed rows per step (default 2)")
    p.add_argument("--baseline-batch", type=int, default=4, help="baseline: examples per step (default 4)")
    p.add_argument(
        "--attn",
        default="auto",
        choices=["auto", "flash_attention_2", "sdpa", "eager"],
        help="ours: attention kernel (auto: FlashAttention-2 if installed, else SDPA)",
    )
    p.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--liger", action=argparse.BooleanOptionalAction, default=True, help="ours: Liger kernels if installed"
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ours: gradient checkpointing (default off; the baseline's qlora keeps PEFT's default, on)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--scratch", default=None)
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2+2 steps: checks the code path only")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench.gpu_train: CUDA is not available on this machine; skipped (nothing written).")
        return 0
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    methods = [m for m in args.methods.split(",") if m]
    if args.smoke:
        methods = [m for m in methods if m == "lora"] or ["lora"]
        args.steps, args.warmup, args.seq_len = 2, 2, min(args.seq_len, 256)
    import transformers
    from transformers.utils import logging as hf_logging

    from trainer.tiny_model import build_tokenizer

    hf_logging.set_verbosity_error()
    own_scratch = args.scratch is None
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="avatune-gpu-bench-")
    tokenizer = build_tokenizer(512)
    model_dir = _write_model(args.config, Path(args.scratch) / "model", tokenizer, tiny=args.smoke)
    n_tokens = (args.warmup + args.steps) * max(args.rows_per_step * args.seq_len, args.baseline_batch * 400) * 2
    examples = _examples(tokenizer, args.seq_len, n_tokens)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    results: list[RunResult] = []
    for method in methods:
        for variant in [v for v in args.variants.split(",") if v]:
            print(f"gpu_train: {method} / {variant} ...", flush=True)
            r = run_one(model_dir, method, variant, examples, args, device)
            if r.error and not r.error.startswith("out of memory") and r.settings.get("liger"):
                print(f"gpu_train: failed with Liger kernels ({r.error}); retrying without them", flush=True)
                args.liger = False
                r = run_one(model_dir, method, variant, examples, args, device)
                args.liger = True
            if (
                r.error
                and r.error.startswith("out of memory")
                and variant == "ours"
                and not args.gradient_checkpointing
            ):
                print("gpu_train: out of memory without gradient checkpointing; retrying with it", flush=True)
                args.gradient_checkpointing = True
                r = run_one(model_dir, method, variant, examples, args, device)
                args.gradient_checkpointing = False
            print(json.dumps(asdict(r)), flush=True)
            results.append(r)
    from bench.common import today

    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run, not a measurement)"
    info = {
        "params": _param_count(config),
        "matmul_params": matmul_params(config),
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": device_name,
        "peak_tflops": args.peak_tflops or (peak_tflops(device_name) if device == "cuda" else None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": today(),
    }
    text = markdown(results, info, "python -m bench.gpu_train " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.smoke or args.no_write:
        print(text)
    else:
        from bench.__main__ import write_section

        write_section(5, text)
        print("gpu_train: wrote section 5 of BENCHMARKS.md")
    if own_scratch:
        import shutil

        shutil.rmtree(args.scratch, ignore_errors=True)
    return 0 if all(not r.error for r in results) else 1


def _param_count(config: Any) -> int:
    """All parameters of the model (embeddings counted once when tied)."""
    embed = config.vocab_size * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    return matmul_params(config) - config.hidden_size * config.vocab_size + embed + head + norms


if __name__ == "__main__":
    sys.exit(main())
