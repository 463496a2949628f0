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


#: rows of ``|affinity|`` made at a time by :func:`abs_topk_indices` (elements per block: 16 Mi, 64 MiB
#: in float32): one reused block instead of a copy of the whole batch
_ABS_BLOCK_ELEMENTS = 1 << 24


def abs_topk_indices(affinity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, keep)``, both ``[..., k]``: per row the column indices of the ``k`` largest
    ``|affinity|`` (as :func:`abs_topk`) and whether each is non-zero (kept with a non-zero code).

    ``|affinity|`` is made a block of rows at a time into one reused buffer (``torch.topk`` works row
    by row, so the indices are those of one call on the whole ``affinity.abs()``), not as a second
    ``[N, F]`` matrix."""
    f = affinity.shape[-1]
    rows = affinity.detach().reshape(-1, f)
    block = max(1, _ABS_BLOCK_ELEMENTS // max(f, 1))
    if rows.shape[0] <= block:
        indices = torch.topk(rows.abs(), k=k, dim=-1, sorted=False).indices
    else:
        buf = torch.empty((block, f), dtype=rows.dtype, device=rows.device)
        parts = []
        for start in range(0, rows.shape[0], block):
            part = rows[start : start + block]
            mag = torch.abs(part, out=buf[: part.shape[0]])
            parts.append(torch.topk(mag, k=k, dim=-1, sorted=False).indices)
        indices = torch.cat(parts)
    indices = indices.view(*affinity.shape[:-1], k)
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
