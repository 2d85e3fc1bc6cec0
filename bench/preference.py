"""Benchmark 8: preference training with the reference's log-probabilities computed once per job
against recomputed on every step.

The function the worker runs for `objective: dpo` (`trainer.preference.train_preference`: TRL's
DPOTrainer with PEFT on the cached base, the reference being the starting adapter) trains the
same job twice: the same model (a ~32M-parameter Llama architecture with random weights,
`trainer.tiny_model`), the same pairs, the same LoRA initialisation and seed; once with
`precompute_ref_log_probs` true (the default: one reference pass over the pairs before training,
none during it) and once false (a reference pass in every step). Each variant runs in a fresh
child process (`python -m bench.preference --variant ...`), so its peak memory (max RSS; on
CUDA torch's peak allocation too) is its own; the parent runs them one after the other.

The pairs are synthetic chats (`bench.throughput.synthetic_chats`, skewed lengths): the
conversation up to its last assistant turn is the prompt, that turn the chosen reply, the last
assistant turn of the next chat the rejected one.

Reported: setup (TRL's preparation: tokenizing, and for `once` the reference pass and TRL's hash
of the model that names its cache), the training loop (`Trainer.train`), pairs trained per
second over both, peak memory, and the results: training loss, held-out preference metrics and
the largest difference between the two adapters' weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, NoControl, machine, table, today

PAIRS = 48
EPOCHS = 2
BATCH = 4
MAX_LENGTH = 512
SEED = 7
VARIANTS = {"once": True, "every": False}  # variant -> precompute_ref_log_probs


def synthetic_pairs(n: int, seed: int) -> list[Any]:
    """`n` judgements from synthetic chats: (prompt, its own last answer, another chat's answer)."""
    from bench.throughput import synthetic_chats
    from contracts.preferences import Judgement

    chats = synthetic_chats(n, seed)
    replies = [chat.messages[-1].content for chat in chats]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [
        Judgement(
            prompt=chat.messages[:-1], chosen=replies[i], rejected=replies[order[i] if order[i] != i else (i + 1) % n]
        )
        for i, chat in enumerate(chats)
    ]


# -- one variant, in its own process ------------------------------------------------------------


def _timed_dpo_trainer(times: dict[str, float]) -> None:
    """Time TRL's DPOTrainer construction (setup) and its `train` (the loop)."""
    from trl import DPOTrainer

    init, train = DPOTrainer.__init__, DPOTrainer.train

    def timed_init(self: Any, *args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        init(self, *args, **kwargs)
        times["setup"] = time.perf_counter() - t0

    def timed_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = train(self, *args, **kwargs)
        times["loop"] = time.perf_counter() - t0
        return result

    DPOTrainer.__init__, DPOTrainer.train = timed_init, timed_train  # type: ignore[method-assign]


def run_variant(
    variant: str, model_dir: Path, out_dir: Path, pairs: int = PAIRS, epochs: int = EPOCHS
) -> dict[str, Any]:
    """Train the benchmark's DPO job with one reference mode; what it measured."""
    import torch
    from transformers.utils import logging as hf_logging

    from contracts.adapter import AdapterSettings
    from contracts.spec import Preference
    from trainer.base_model import BaseModelCache
    from trainer.preference import train_preference
    from trainer.preference_data import preference_set

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass shows a progress bar otherwise
    logging.getLogger("avatune.trainer").setLevel(logging.WARNING)
    base = BaseModelCache().get(str(model_dir), "lora")
    cuda = base.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = preference_set(synthetic_pairs(pairs, SEED), "dpo", 0.1, SEED)
    cfg = AdapterSettings(
        method="lora", r=16, lora_alpha=32, lora_dropout=0.0, num_epochs=epochs, batch_size=BATCH,
        max_seq_length=MAX_LENGTH, warmup_ratio=0.0, seed=SEED, precision="fp32" if not cuda else None,
    )  # fmt: skip
    options = Preference(learning_rate=1e-4, precompute_ref_log_probs=VARIANTS[variant]).resolved()
    times: dict[str, float] = {}
    _timed_dpo_trainer(times)
    t0 = time.perf_counter()
    outcome = train_preference(base, cfg, options, data, out_dir, NoControl())
    total = time.perf_counter() - t0
    metrics = outcome.metrics.as_dict()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "device": str(base.device),
        "parameters": sum(p.numel() for p in base.model.parameters()),
        "pairs": pairs,
        "epochs": epochs,
        "train_pairs": len(data.train),
        "eval_pairs": len(data.eval),
        "total_s": total,
        "setup_s": times.get("setup", 0.0),
        "loop_s": times.get("loop", 0.0),
        "steps": metrics["steps"],
        "precision": metrics["precision"],
        "peak_rss_mib": peak / 1024,
        "rss_after_load_mib": rss_loaded / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "metrics": {
            k: metrics.get(k)
            for k in ("train_loss", "preference_accuracy", "reward_margin", "logp_margin_before", "logp_margin_after")
        },
        "adapter": str(out_dir / "adapter"),
    }


# -- the benchmark ------------------------------------------------------------------------------


def _max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert left.keys() == right.keys()
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def run(pairs: int = PAIRS, epochs: int = EPOCHS, model_size: tuple[int, int] = (512, 8), log=print) -> dict[str, Any]:
    """Both variants, one after the other; `model_size`: the tiny model's (hidden size, layers)."""
    from trainer.tiny_model import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="avatune-bench-preference-"))
    hidden, layers = model_size
    model_dir = write_tiny_model(tmp / "model", hidden_size=hidden, num_layers=layers, num_heads=8)
    results = {}
    for variant in VARIANTS:
        log(f"    {variant} ...")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.preference",
                "--variant",
                variant,
                "--model",
                str(model_dir),
                "--out",
                str(tmp / variant),
                "--pairs",
                str(pairs),
                "--epochs",
                str(epochs),
            ],  # fmt: skip
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"    {variant}: {results[variant]['total_s']:.1f} s")
    difference = _max_weight_difference(Path(results["once"]["adapter"]), Path(results["every"]["adapter"]))
    return {
        "results": results,
        "weight_difference": difference,
        "model_size": model_size,
        "machine": machine(),
        "date": today(),
    }


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} MiB"


def markdown(r: dict[str, Any], cmd: str) -> str:
    once, every = r["results"]["once"], r["results"]["every"]
    rows = []
    for name, res in (("**once per job** (`precompute_ref_log_probs: true`, the default)", once),
                      ("every step (`false`)", every)):  # fmt: skip
        pairs_trained = res["train_pairs"] * res["epochs"]
        rows.append([
            name, f"{res['setup_s']:.1f} s", f"{res['loop_s']:.1f} s", f"{res['total_s']:.1f} s",
            f"{pairs_trained / res['total_s']:.2f}", f"{pairs_trained / res['loop_s']:.2f}",
            _mib(res["peak_rss_mib"]), _mib(res["cuda_peak_mib"]),
            f"{res['metrics']['train_loss']:.6f}", res["metrics"]["preference_accuracy"],
            res["metrics"]["reward_margin"],
        ])  # fmt: skip
    speedup = every["total_s"] / once["total_s"]
    loop_speedup = every["loop_s"] / once["loop_s"]
    same_loss = abs(once["metrics"]["train_loss"] - every["metrics"]["train_loss"])
    memory = every["peak_rss_mib"] - once["peak_rss_mib"]
    return "\n".join(
        [
            "## 8. Preference training: reference log-probabilities once per job vs every step",
            "",
            f"One DPO job through `trainer.preference.train_preference` (what the worker runs: TRL's DPOTrainer "
            f"with PEFT on the cached base), twice: Llama architecture, {once['parameters'] / 1e6:.1f}M parameters, "
            f"random weights (`trainer.tiny_model`: hidden {r['model_size'][0]}, {r['model_size'][1]} layers), "
            f"{once['precision']} on {once['device']}; LoRA r=16 on every linear layer; {once['pairs']} synthetic "
            f"pairs ({once['train_pairs']} trained, {once['eval_pairs']} held out; prompt = a synthetic chat up to "
            f"its last answer, chosen = that answer, rejected = another chat's), max_length {MAX_LENGTH}, "
            f"{once['epochs']} epochs, batch {BATCH} ({once['steps']} steps), beta 0.1, lr 1e-4, seed {SEED}. Each "
            "variant in a fresh process, one after the other, same data, same initialisation.",
            "",
            table(
                [
                    "reference log-probs",
                    "setup",
                    "training loop",
                    "total",
                    "pairs/s (total)",
                    "pairs/s (loop)",
                    "peak RSS",
                    "peak CUDA",
                    "train loss",
                    "held-out accuracy",
                    "reward margin",
                ],
                rows,
            ),  # fmt: skip
            "",
            f"- Throughput: once per job trains **{speedup:.2f}×** the pairs per second of every step over the "
            f"whole job ({loop_speedup:.2f}× in the training loop alone): every step's reference pass (a no-grad "
            f"forward of both replies) is gone from the loop, for one pass over the pairs in the setup (which "
            f"also hashes the model's weights to name TRL's cache of the results).",
            f"- Same result: train loss {once['metrics']['train_loss']:.6f} vs {every['metrics']['train_loss']:.6f} "
            f"(difference {same_loss:.2g}); the two adapters' weights differ by at most {r['weight_difference']:.2g} "
            f"(the reference pass batches the pairs in their original order, the training steps in shuffled "
            f"order, so padding differs; the values are the same up to float rounding).",
            f"- Peak memory: {_mib(once['peak_rss_mib'])} vs {_mib(every['peak_rss_mib'])} RSS "
            f"({_mib(abs(memory))} {'less' if memory >= 0 else 'more'} once per job; the process held "
            f"{_mib(once['rss_after_load_mib'])} after loading the base)"
            + (
                f", CUDA {_mib(once['cuda_peak_mib'])} vs {_mib(every['cuda_peak_mib'])}"
                if once["cuda_peak_mib"]
                else ""
            )
            + ". With PEFT neither keeps a second model (the reference is the adapter switched to its frozen "
            "copy): the difference is the reference pass's activations inside each step; what once per job "
            "mostly saves is compute.",
            "- The held-out numbers are those of random text (synthetic pairs on a random model: nothing to "
            "generalise from); they are here to show that both variants agree, not how well DPO works.",
            "",
            f"Machine: {r['machine']}. Date: {r['date']}. Reproduce: `{cmd}`"
            + ("" if "--only 8" in cmd else " (this section alone: `python -m bench --only 8`)")
            + ".",
            "",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.preference", description="one variant of benchmark 8")
    p.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pairs", type=int, default=PAIRS)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    args = p.parse_args()
    print(json.dumps(run_variant(args.variant, args.model, args.out, args.pairs, args.epochs)), flush=True)


if __name__ == "__main__":
    main()
