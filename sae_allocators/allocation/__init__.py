"""Allocation rules: small pure tensor functions from affinities to a selection.

Every rule takes an affinity matrix ``[N, F]`` (N tokens, F features; callers flatten any
leading dimensions) and returns the codes with the unselected entries zeroed. They know nothing
about SAELens, so other engines can reuse them and tests can check them alone.
"""

from sae_allocators.allocation.batch import batch_topk

__all__ = ["batch_topk"]
