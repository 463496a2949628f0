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
    if acts.is_sparse:  # (before the reshape: sparse COO tensors cannot be reshaped)
        acts = acts.to_dense()
    flat = acts.reshape(-1, acts.shape[-1])
    if group is None:
        stride = max(1, flat.shape[0] // sample_tokens)
        frac = M.batch_density(flat[::stride]).to(feature_density.dtype)
    else:  # data-parallel: the same strided sample of the global batch, counts summed over ranks
        rows, n_sample = strided_token_sample(flat.shape[0], sample_tokens, group, flat.device)
        fired = all_reduce(M.firing(flat.index_select(0, rows)).float().sum(0), "sum", group)
        frac = (fired / max(n_sample, 1)).to(feature_density.dtype)
    density_steps += 1
    rate = (1.0 / density_steps.double()).clamp_min(1.0 / window).to(frac.dtype)
    feature_density.lerp_(frac, rate)
