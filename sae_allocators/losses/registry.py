"""Name -> auxiliary loss: the losses the plugin host collected from ``register_aux_losses`` hooks.

The table itself lives in the plugin state (:mod:`sae_allocators.plugin_state`), built by
``host.load()``; this module checks offers (:func:`add`, used by the host) and reads the table.
"""

from __future__ import annotations

from typing import Any, MutableMapping, Protocol, runtime_checkable

from sae_allocators import plugin_state
from sae_allocators.plugin_state import LossEntry as Entry


@runtime_checkable
class AuxLoss(Protocol):
    """An auxiliary loss: ``loss(sae, step)`` returns a scalar tensor (or a dict of named ones).

    ``sae`` is the training SAE (its buffers, e.g. running densities, are available) and
    ``step`` an :class:`sae_allocators.losses.AuxLossInput` with the forward-pass tensors.
    """

    def __call__(self, sae: Any, step: Any) -> Any: ...


def add(
    table: MutableMapping[str, Entry], name: str, loss: Any, *, description: str = "", provider: str = ""
) -> str | None:
    """Put ``loss`` into ``table`` under ``name``; return a problem message instead of raising."""
    if not isinstance(name, str) or not name:
        return f"aux loss name {name!r} must be a non-empty string"
    if not callable(loss):
        return f"aux loss {name!r} must be callable as loss(sae, step), got {loss!r}"
    old = table.get(name)
    if old is not None and old.provider != provider:
        return f"aux loss {name!r} is already provided by {old.provider}; the offer from {provider} was ignored"
    table[name] = Entry(name, loss, description, provider)
    return None


def available() -> list[str]:
    return sorted(plugin_state.current().losses)


def get(name: str) -> Entry:
    """Return the registered loss, or raise ``ValueError`` naming the field and the fix."""
    try:
        return plugin_state.current().losses[name]
    except KeyError:
        raise ValueError(
            f"aux_loss={name!r} is not a registered auxiliary loss. Use one of "
            f"{', '.join(available())}, or install/enable the plugin that provides it."
        ) from None


__all__ = ["AuxLoss", "Entry", "add", "available", "get"]
