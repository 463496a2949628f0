"""Running feature densities: the per-feature firing rate the ``zipf`` loss and the metrics read.

A mean over the first ``density_window`` steps, then an exponential moving average with rate
``1/density_window``, measured on a strided token subsample (summed over ranks when data-parallel).
The state is two buffers of the training SAE (``feature_density``, ``density_steps``; see
:class:`sae_allocators.losses.AuxLossMixin`), updated in place here.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_allocators import metrics as M
from sae_allocators.distributed.comm import all_reduce
from sae_allocators.distributed.select import strided_token_sample


@torch.no_grad()
def update_running_density(
    feature_density: torch.Tensor,
    density_steps: torch.Tensor,
    feature_acts: torch.Tensor,
    window: int,
    sample_tokens: int,
    group: Any = None,
) -> None:
    """Fold this batch's firing rates into ``feature_density`` (and count the step in
    ``density_steps``); measured on every ``N // sample_tokens``-th token (a strided subsample:
    counting over the whole ``[N, d_sae]`` batch would cost a pass as slow as the selection itself)."""
    acts = feature_acts.detach()
    n = acts.shape[:-1].numel()
    if group is None:
        stride = max(1, n // sample_tokens)
        rows = torch.arange(0, n, stride, device=acts.device)
        frac = (_fired_counts(acts, rows) / rows.numel()).to(feature_density.dtype)
    else:  # data-parallel: the same strided sample of the global batch, counts summed over ranks
        rows, n_sample = strided_token_sample(n, sample_tokens, group, acts.device)
        fired = all_reduce(_fired_counts(acts, rows), "sum", group)
        frac = (fired / max(n_sample, 1)).to(feature_density.dtype)
    density_steps += 1
    rate = (1.0 / density_steps.double()).clamp_min(1.0 / window).to(frac.dtype)
    feature_density.lerp_(frac, rate)


def _fired_counts(acts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """On how many of the tokens ``rows`` (flat token indices) each feature fires, ``[F]`` float32.

    Dense codes: those rows' firing mask, summed. Sparse COO codes (the sparse step hands SAELens's
    trainer these): a count of the stored non-zero entries whose token is sampled, ``O(k N)``, no row
    made dense; the same numbers (``M.batch_density`` of the dense rows is this count over
    ``len(rows)``, exactly, for counts below 2**24)."""
    if not acts.is_sparse:
        return M.firing(acts.reshape(-1, acts.shape[-1]).index_select(0, rows)).float().sum(0)
    acts = acts.coalesce()  # duplicates summed, as to_dense() would
    idx = acts.indices()
    flat = torch.zeros_like(idx[0])
    for d, size in enumerate(acts.shape[:-1]):
        flat = flat * size + idx[d]
    sampled = torch.zeros(acts.shape[:-1].numel(), dtype=torch.bool, device=acts.device)
    sampled[rows] = True
    keep = sampled[flat] & (acts.values() != 0)
    return torch.bincount(idx[-1][keep], minlength=acts.shape[-1]).float()
