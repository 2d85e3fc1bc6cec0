"""Packed attention for padding-free batches.

With padding-free batches, SDPA gets one (1, T) sequence and a block-diagonal mask built from
position_ids: it computes attention over all T x T positions and throws most away (the mask
also keeps the kernel off its causal fast path). `PACKED_SDPA` runs causal SDPA once per
example instead (the boundaries are where position_ids stop counting up, the rule
transformers itself uses), so attention costs sum(len^2) / 2 rather than T^2 and no mask is
built. Results are the same as the masked path (tests/bench/test_bench_training.py). Anything
else (a padding mask, a batch of several rows, a cache) goes to the stock SDPA function.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

PACKED_SDPA = "avatune_packed_sdpa"
_segments_cache: list[Any] = [None, None]  # (weakref to the position_ids tensor, its segments)


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each example in a (1, T) packed row; computed once per forward."""
    ref, segments = _segments_cache
    if ref is not None and ref() is position_ids:
        return segments
    positions = position_ids[0]
    starts = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *starts, int(positions.shape[0])]
    segments = list(zip(bounds[:-1], bounds[1:]))
    _segments_cache[0], _segments_cache[1] = weakref.ref(position_ids), segments
    return segments


def packed_sdpa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] > 1
        and key.shape[2] == query.shape[2]
        and position_ids.shape[-1] == query.shape[2]
    )
    segments = _segments(position_ids) if packed else []
    if len(segments) < 2:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    outputs = [
        sdpa_attention_forward(
            module,
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
        )[0]
        for a, b in segments
    ]
    return torch.cat(outputs, dim=1), None


def packed_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """No mask for padding-free input (boundaries come from position_ids); SDPA's otherwise."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


register_packed_attention()


def use_packed_attention(model: Any) -> str | None:
    """Switch a model on SDPA to PACKED_SDPA; the implementation to restore afterwards (None: unchanged)."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation(PACKED_SDPA)
    return current
