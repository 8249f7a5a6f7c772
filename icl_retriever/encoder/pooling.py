"""Pooling: token states to one vector per prompt, the last step of every embedding (torch and the
ONNX export share it, so both runtimes pool alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from icl_retriever.encoder.config import Pooling

if TYPE_CHECKING:
    import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling, *, normalize: bool = True) -> torch.Tensor:
    """Pool token states ``(batch, tokens, dim)`` into one float32 vector per prompt: the mean over real
    tokens, the first token (``cls``) or the last real token (``last``, right padding); unit length when
    ``normalize``."""
    import torch

    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        last = mask.sum(1) - 1
        pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    pooled = pooled.float()
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled
