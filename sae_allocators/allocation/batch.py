"""Batch-level allocation: keep the ``k * N`` largest affinities of the whole batch."""

from __future__ import annotations

import math

import torch


def budget(k: float, n_tokens: int) -> int:
    """The number of (token, feature) entries a batch of ``n_tokens`` may keep at average ``k``."""
    return int(math.floor(k * n_tokens))


def batch_topk(affinity: torch.Tensor, k: float) -> torch.Tensor:
    """Mutual Choice / BatchTopK selection (reference version).

    Keeps the ``floor(k * N)`` largest entries of ``relu(affinity)`` over the flattened ``[N, F]``
    matrix and zeroes the rest, so tokens and features get a variable share of the budget.
    Leading dimensions of ``affinity`` are flattened and restored.
    """
    acts = affinity.relu()
    flat = acts.reshape(-1)
    n_tokens = acts.shape[:-1].numel()
    keep = min(budget(k, n_tokens), flat.numel())
    out = torch.zeros_like(flat)
    if keep > 0:
        top = torch.topk(flat, keep, sorted=False)
        out.scatter_(0, top.indices, top.values)
    return out.reshape(acts.shape)
