"""Name -> auxiliary loss, filled by the plugin host from ``register_aux_losses`` hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class AuxLoss(Protocol):
    """An auxiliary loss: ``loss(sae, step)`` returns a scalar tensor (or a dict of named ones).

    ``sae`` is the training SAE (its buffers, e.g. running densities, are available) and
    ``step`` an :class:`sae_allocators.losses.AuxLossInput` with the forward-pass tensors.
    """

    def __call__(self, sae: Any, step: Any) -> Any: ...


@dataclass(frozen=True)
class Entry:
    name: str
    loss: AuxLoss
    description: str
    provider: str


_LOSSES: dict[str, Entry] = {}


def add(name: str, loss: Any, *, description: str = "", provider: str = "") -> str | None:
    """Register ``loss`` under ``name``; return a problem message instead of raising."""
    if not isinstance(name, str) or not name:
        return f"aux loss name {name!r} must be a non-empty string"
    if not callable(loss):
        return f"aux loss {name!r} must be callable as loss(sae, step), got {loss!r}"
    old = _LOSSES.get(name)
    if old is not None and old.provider != provider:
        return (
            f"aux loss {name!r} is already provided by {old.provider}; the offer from {provider} "
            "was ignored"
        )
    _LOSSES[name] = Entry(name, loss, description, provider)
    return None


def available() -> list[str]:
    return sorted(_LOSSES)


def get(name: str) -> Entry:
    """Return the registered loss, or raise ``ValueError`` naming the field and the fix."""
    from sae_allocators import host

    host.load()
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(
            f"aux_loss={name!r} is not a registered auxiliary loss. Use one of "
            f"{', '.join(available())}, or install/enable the plugin that provides it."
        ) from None
