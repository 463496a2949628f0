"""The one place that touches SAELens's registries (``sae_lens.registry``).

SAELens keeps two plain dicts, read at call time by ``get_sae_class`` /
``get_sae_training_class``. We write them directly (``register_sae_class`` raises on a second
registration, which would make re-imports crash). :mod:`sae_allocators.patches` swaps each dict for
an :class:`ExplainingRegistry`, whose missing keys raise :class:`UnknownArchitectureError` -- still a
``KeyError`` for SAELens's own handlers -- with a message naming the architecture, what is
registered, and which package provides it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import sae_lens.registry as _registry

from sae_allocators.names import DISTRIBUTION, ENV_NO_AUTOLOAD, PROVIDED_ARCHITECTURES

INFERENCE = "inference"
TRAINING = "training"
DICT_NAMES = {INFERENCE: "SAE_CLASS_REGISTRY", TRAINING: "SAE_TRAINING_CLASS_REGISTRY"}


class UnknownArchitectureError(KeyError):
    """An architecture name nobody registered. Subclasses ``KeyError`` for compatibility."""

    def __init__(self, architecture: str, side: str, registered: list[str]):
        self.architecture = architecture
        self.side = side
        self.registered = registered
        super().__init__(architecture)

    def __str__(self) -> str:
        name, side = self.architecture, self.side
        msg = f"Unknown SAE architecture {name!r}: no {side} class is registered in SAELens under that name."
        if name in PROVIDED_ARCHITECTURES:
            autoload_error = _autoload_error()
            if os.environ.get(ENV_NO_AUTOLOAD):
                how = f"{ENV_NO_AUTOLOAD} is set, so run `import sae_allocators` before loading"
            elif _installed():
                how = (
                    f"{DISTRIBUTION} is installed, but its architectures are not registered in this process: "
                    "run `import sae_allocators` before loading (if that raises, its error says why)"
                )
                if autoload_error:
                    how += f"; registering them automatically when sae_lens was imported failed with {autoload_error}"
            else:
                how = f"`pip install {DISTRIBUTION}`, then `import sae_allocators` before loading"
            msg += f" {name!r} is provided by the {DISTRIBUTION} package: {how}."
        else:
            msg += (
                " Check the spelling, or install/import the package that provides it"
                " (`sae-allocators list` shows every architecture and its provider)."
            )
        msg += f" Registered {side} architectures: {', '.join(sorted(self.registered)) or '(none)'}."
        return msg


def _installed() -> bool:
    import importlib.metadata as md

    try:
        md.version(DISTRIBUTION)
    except md.PackageNotFoundError:
        return False
    return True


def _autoload_error() -> str | None:
    """What stopped the automatic registration at ``import sae_lens`` (``sae_allocators_autoload``)."""
    autoload = sys.modules.get("sae_allocators_autoload")
    return getattr(autoload, "last_error", None)


class ExplainingRegistry(dict):
    """A SAELens registry dict whose missing keys raise :class:`UnknownArchitectureError`."""

    side: str = INFERENCE

    def __missing__(self, key: str) -> Any:
        raise UnknownArchitectureError(key, self.side, list(self.keys()))


def registry(side: str) -> dict[str, tuple[type, type]]:
    return getattr(_registry, DICT_NAMES[side])


def get(side: str, name: str) -> tuple[type, type] | None:
    return registry(side).get(name)


def put(side: str, name: str, entry: tuple[type, type]) -> None:
    registry(side)[name] = entry


def remove(side: str, name: str) -> None:
    registry(side).pop(name, None)


def all_names() -> list[str]:
    return sorted(set(registry(INFERENCE)) | set(registry(TRAINING)))


def provider_records() -> dict[str, dict[str, Any]]:
    """Who registered each name through this project's host, kept *inside* ``sae_lens.registry``
    so that reloading ``sae_allocators`` keeps the record (and re-registration stays idempotent).
    """
    return _registry.__dict__.setdefault("_sae_allocators_providers", {})
