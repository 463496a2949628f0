"""Gradient-aware activations for g-SAE training (see ``docs/gradient_topk.md``).

- :class:`GradientActivationsStore`: SAELens's ``ActivationsStore`` yielding ``[x | dL/dx]`` rows.
- :mod:`sae_allocators.gradient.dispatch`: makes SAELens's runner build that store for configs that
  ask for it (``gradient_topk``).
"""

from sae_allocators.gradient.store import (
    LOSS_DESCRIPTION,
    GradientActivationsStore,
    GradientStoreError,
    check_model,
    forward_backward,
    split_rows,
)

__all__ = [
    "LOSS_DESCRIPTION",
    "GradientActivationsStore",
    "GradientStoreError",
    "check_model",
    "forward_backward",
    "split_rows",
]
