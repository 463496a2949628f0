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
        frac = M.batch_density(_token_rows(acts, rows)).to(feature_density.dtype)
    else:  # data-parallel: the same strided sample of the global batch, counts summed over ranks
        rows, n_sample = strided_token_sample(n, sample_tokens, group, acts.device)
        fired = all_reduce(M.firing(_token_rows(acts, rows)).float().sum(0), "sum", group)
        frac = (fired / max(n_sample, 1)).to(feature_density.dtype)
    density_steps += 1
    rate = (1.0 / density_steps.double()).clamp_min(1.0 / window).to(frac.dtype)
    feature_density.lerp_(frac, rate)


def _token_rows(acts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The dense ``[len(rows), F]`` codes of the tokens ``rows`` (flat token indices) of ``acts``
    (``[..., F]``, dense or sparse COO: then only those rows are made dense, never the batch)."""
    if not acts.is_sparse:
        return acts.reshape(-1, acts.shape[-1]).index_select(0, rows)
    if acts.dim() > 2:  # a COO tensor cannot be reshaped: flatten its token indices instead
        acts = acts.coalesce()
        idx = acts.indices()
        lead = acts.shape[:-1]
        flat = torch.zeros_like(idx[0])
        for d, size in enumerate(lead):
            flat = flat * size + idx[d]
        acts = torch.sparse_coo_tensor(
            torch.stack([flat, idx[-1]]),
            acts.values(),
            (lead.numel(), acts.shape[-1]),
            device=acts.device,
            check_invariants=False,
        )
    return acts.index_select(0, rows).to_dense()
