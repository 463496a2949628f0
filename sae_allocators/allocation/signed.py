"""Signed allocation: rank by ``|affinity|``, keep the signed value (AbsTopK, Zhu et al. 2025).

A signed rule never applies a ReLU: a feature may fire negatively, and "firing" means
``code != 0``. These are the signed counterparts of the ReLU rules in
:mod:`sae_allocators.allocation.batch`.
"""

from __future__ import annotations

import torch

from sae_allocators.allocation.batch import budget, mutual_choice_indices
from sae_allocators.sparse import keep_flat


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


def abs_topk_indices(affinity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, keep)``, both ``[..., k]``: per row the column indices of the ``k`` largest
    ``|affinity|`` (as :func:`abs_topk`) and whether each is non-zero (kept with a non-zero code)."""
    indices = torch.topk(affinity.abs(), k=k, dim=-1, sorted=False).indices
    return indices, affinity.gather(-1, indices) != 0


def signed_mutual_choice_indices(affinity: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual Choice by magnitude as ``(flat, tau)``: ascending row-major indices of the kept
    entries and ``tau`` (0-d), the smallest kept magnitude. Exactly ``min(floor(k N), #non-zero)``
    entries: the largest ``|affinity|``, ties by lowest row-major index (as the ReLU rule in
    :mod:`sae_allocators.allocation.batch`); ``tau = 0`` when fewer than ``floor(k N)`` entries
    are non-zero (then every non-zero entry is kept), ``+inf`` when the budget is 0."""
    mag = affinity.detach().abs()
    return mutual_choice_indices(mag, k)


def signed_mutual_choice_select(affinity: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual Choice by magnitude: keep the ``floor(k * N)`` entries of largest ``|affinity|``
    over all leading dimensions (N = their product), signed values kept; returns ``(codes, tau)``
    as in :func:`signed_mutual_choice_indices`. Differentiable in ``affinity``.
    """
    if affinity.numel() == 0:
        return affinity.clone(), affinity.new_zeros(())
    kept, tau = signed_mutual_choice_indices(affinity, k)
    flat = affinity.reshape(-1)
    codes = keep_flat(flat, kept)
    return codes.view(affinity.shape), tau


def signed_mutual_choice_reference(affinity: torch.Tensor, k: float) -> torch.Tensor:
    """Plain version of :func:`signed_mutual_choice_select`: a full stable sort of ``|affinity|`` (tests, benchmarks)."""
    flat = affinity.reshape(-1)
    n_tokens = affinity.numel() // max(affinity.shape[-1], 1)
    keep = min(budget(k, n_tokens), flat.numel())
    out = torch.zeros_like(flat)
    if keep > 0:
        idx = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]
        idx = idx[flat[idx] != 0]
        out.scatter_(0, idx, flat.gather(0, idx))
    return out.reshape(affinity.shape)
