"""Auxiliary losses, composable with every training architecture of this project.

A loss is registered by name through the ``register_aux_losses`` hook and chosen with a
training config's ``aux_loss`` field. See :mod:`sae_allocators.losses.registry`.
"""

from sae_allocators.losses.registry import AuxLoss, available, get

__all__ = ["AuxLoss", "available", "get"]
