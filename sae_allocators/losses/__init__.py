"""Auxiliary losses, composable with every training architecture of this project.

A loss is registered by name through the ``register_aux_losses`` hook and chosen with a
training config's ``aux_loss`` field (see :class:`AuxLossConfig`). A loss is a callable
``loss(sae, step)`` returning a scalar tensor or a dict of named ones; ``sae`` is an
:class:`AuxLossMixin` training SAE and ``step`` an :class:`AuxLossInput`.
"""

from sae_allocators.losses.base import AuxLossInput, AuxLossMixin, check_finite
from sae_allocators.losses.config import AuxLossConfig
from sae_allocators.losses.registry import AuxLoss, available, get

__all__ = ["AuxLoss", "AuxLossConfig", "AuxLossInput", "AuxLossMixin", "available", "check_finite", "get"]
