"""Data-parallel training on many processes (torch.distributed), with global batch allocation.

- :mod:`~sae_allocators.distributed.comm` -- collectives that are no-ops without a process group.
- :mod:`~sae_allocators.distributed.select` -- Mutual Choice / Feature Choice over the union of the
  ranks' batches, exchanging O(k N) candidates and O(F) bounds (pure functions).
- :mod:`~sae_allocators.distributed.data_parallel` -- :func:`make_data_parallel` (gradient averaging,
  config check, global-allocation marker) and :func:`sync_trainer` (SAELens trainer statistics).
- :mod:`~sae_allocators.distributed.launch` -- ``sae-allocators train --nproc-per-node N ...`` and
  ``torchrun ... -m sae_allocators.distributed.launch ...``.

See docs/distributed.md.
"""

from sae_allocators.distributed.comm import active, all_gather_variable, all_reduce, rank, world
from sae_allocators.distributed.data_parallel import (
    DataParallel,
    DistributedConfigError,
    group_of,
    make_data_parallel,
    sync_trainer,
)
from sae_allocators.distributed.select import global_budget_select, global_column_select, global_mean

__all__ = [
    "DataParallel",
    "DistributedConfigError",
    "active",
    "all_gather_variable",
    "all_reduce",
    "global_budget_select",
    "global_column_select",
    "global_mean",
    "group_of",
    "make_data_parallel",
    "rank",
    "sync_trainer",
    "world",
]
