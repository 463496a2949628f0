"""Signed allocation: rank by ``|affinity|``, keep the signed value (AbsTopK, Zhu et al. 2025).

A signed rule never applies a ReLU: a feature may fire negatively, and "firing" means
``code != 0``. These are the signed counterparts of the ReLU rules in
:mod:`sae_allocators.allocation.batch`.
"""

from __future__ import annotations

import torch

from sae_allocators.allocation.batch import budget, kth_largest


def abs_topk(affinity: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, keep the ``k`` entries of largest ``|affinity|`` with their sign; zero the rest.

    The same computation as SAELens's ``AbsTopK`` activation (>= 6.53): one ``torch.topk`` of
    ``|affinity|`` along the last dimension, then the signed values are scattered back.
    Differentiable in ``affinity`` (through the gather).
    """
    idx = torch.topk(affinity.abs(), k=k, dim=-1, sorted=False).indices
    out = torch.zeros_like(affinity)
    out.scatter_(-1, idx, affinity.gather(-1, idx))
    return out


def signed_mutual_choice_select(affinity: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual Choice by magnitude: keep the ``floor(k * N)`` entries of largest ``|affinity|``
    over all leading dimensions (N = their product), signed values kept; returns ``(codes, tau)``.

    ``tau`` (0-d, >= 0) is the smallest kept magnitude (0 when fewer than ``floor(k * N)`` entries
    are non-zero: then every non-zero entry is kept). Entries tied with ``tau`` are all kept, as in
    :func:`sae_allocators.allocation.batch.mutual_choice_select`. Differentiable in ``affinity``.
    """
    if affinity.numel() == 0:
        return affinity.clone(), affinity.new_zeros(())
    n_tokens = affinity.numel() // affinity.shape[-1]
    mag = affinity.detach().abs().reshape(-1)
    kk = min(budget(k, n_tokens), mag.numel())
    if kk <= 0:
        return affinity * 0, affinity.new_tensor(float("inf"))
    tau = kth_largest(mag, kk, row_len=affinity.shape[-1])
    keep = affinity.detach().abs() >= tau
    if float(tau) <= 0:
        keep = affinity.detach() != 0
    return affinity * keep, tau


def signed_mutual_choice_reference(affinity: torch.Tensor, k: float) -> torch.Tensor:
    """Plain full-``torch.topk`` version of :func:`signed_mutual_choice_select` (tests, benchmarks)."""
    flat = affinity.reshape(-1)
    n_tokens = affinity.numel() // max(affinity.shape[-1], 1)
    keep = min(budget(k, n_tokens), flat.numel())
    out = torch.zeros_like(flat)
    if keep > 0:
        idx = torch.topk(flat.abs(), keep, sorted=False).indices
        out.scatter_(0, idx, flat.gather(0, idx))
    return out.reshape(affinity.shape)
