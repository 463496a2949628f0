"""Allocation rules: small pure tensor functions from affinities to a selection.

Every rule takes an affinity matrix ``[N, F]`` (N tokens, F features; leading dimensions are
flattened) and returns the codes with the unselected entries zeroed. They know nothing about
SAELens, so other engines can reuse them and tests can check them alone.

- :mod:`~sae_allocators.allocation.batch`: Mutual Choice / BatchTopK (exact, no full sort).
- :mod:`~sae_allocators.allocation.feature_choice`: Feature Choice capacities and selection.
"""

from sae_allocators.allocation.batch import batch_topk, kth_largest, mutual_choice_select
from sae_allocators.allocation.feature_choice import capacities, feature_choice_select, usage_rank

__all__ = ["batch_topk", "capacities", "feature_choice_select", "kth_largest", "mutual_choice_select", "usage_rank"]
