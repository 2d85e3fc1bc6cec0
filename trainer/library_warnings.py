"""Warnings the libraries raise, on every job or every start, that our code cannot act on:
filtered by exact message at each trainer entry point (the worker, a data-parallel rank), so
the log shows what matters. Each entry says where it comes from and why it is safe to drop;
anything else still reaches the log (`logging.captureWarnings`).
"""

from __future__ import annotations

import logging
import warnings

# Python warnings: (message regex, category). Why each is dropped:
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # peft's PeftModel.__init__ (get_peft_model, PeftModel.from_pretrained: every training,
    # generation and fuse job) reads the alias transformers 5 deprecated; our own code uses
    # `is_activation_checkpointing` (trainer.training). Goes once peft reads the new name.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)

# Log lines: logger -> message prefixes. Why each is dropped:
KNOWN_LOG_LINES: dict[str, tuple[str, ...]] = {
    # bitsandbytes' CPU backend asks the model hub for an optional 4-bit kernel when it is
    # imported (every worker start on a CPU with AVX512-BF16) and falls back to its own kernel.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
}


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self._prefixes)


def quiet_known_warnings() -> None:
    """Drop the warnings and log lines above (by message: nothing else is hidden)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger, prefixes in KNOWN_LOG_LINES.items():
        logging.getLogger(logger).addFilter(_DropKnown(prefixes))
