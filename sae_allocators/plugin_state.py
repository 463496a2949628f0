"""The plugin state: what :func:`sae_allocators.host.load` found, in one object that everything else only reads.

One :class:`PluginState` holds the load's report (plugins loaded, plugins refused and why), pluggy's
manager, the architectures the host registered into SAELens (with who provides each) and the
auxiliary losses. ``host.load()`` builds a new one on every (forced) load and publishes it with
:func:`publish`; every other module reads it with :func:`current`.

This module imports nothing of the package, so any module may read the state without importing the
host -- which is what keeps the package's import graph free of cycles (the host imports the
architectures and losses it loads; they never import the host).

SAELens's own registry dicts stay where SAELens reads them (:mod:`sae_allocators.saelens_registry`
is the one place that writes them, together with the record of which distribution registered each
name, kept inside ``sae_lens.registry`` so that it survives a re-import of this package).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

SAELENS = "sae-lens"


@dataclass(frozen=True)
class Source:
    """Where a plugin comes from."""

    plugin: str  # entry-point name or module name
    distribution: str
    version: str
    builtin: bool = False

    def describe(self) -> str:
        return f"{self.distribution} {self.version}".strip()


@dataclass
class Provider:
    """Who provides one architecture name, as recorded by the host."""

    name: str
    distribution: str
    version: str
    plugin: str
    has_training: bool
    has_inference: bool
    description: str = ""
    deferred: list[str] = field(default_factory=list)  # offers we did not take, "dist version"

    @property
    def is_saelens(self) -> bool:
        return self.distribution == SAELENS


@dataclass
class LoadReport:
    plugins: list[Source] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (plugin description, error)
    external_enabled: bool = True


@dataclass(frozen=True)
class LossEntry:
    """One registered auxiliary loss."""

    name: str
    loss: Any  # an sae_allocators.losses.AuxLoss
    description: str
    provider: str


@dataclass(frozen=True)
class PluginState:
    """Everything one ``host.load()`` found (read-only for everyone but the host)."""

    report: LoadReport
    manager: Any  # pluggy.PluginManager
    architectures: Mapping[str, Provider]  # the names this load registered or deferred, by name
    losses: Mapping[str, LossEntry]


_current: PluginState | None = None


def publish(state: PluginState) -> None:
    """Make ``state`` the current one (called by ``host.load()`` only)."""
    global _current
    _current = state


def loaded() -> bool:
    return _current is not None


def current() -> PluginState:
    """The state of the last completed ``host.load()``.

    Raises ``RuntimeError`` when no load has completed (``import sae_allocators`` runs one; a failed
    import leaves none)."""
    if _current is None:
        raise RuntimeError(
            "sae-allocators' plugins are not loaded in this process: run `import sae_allocators` (it calls "
            "sae_allocators.host.load()) first; if that raised, its error says why."
        )
    return _current


#: the host's ``load`` (set by the host when it is imported): lets a module that the host itself
#: depends on (``sae_folder``, through the runner save seam) make sure the plugins are loaded
#: without importing the host
_loader: Callable[[], Any] | None = None


def set_loader(loader: Callable[[], Any]) -> None:
    """Called once by :mod:`sae_allocators.host` at import."""
    global _loader
    _loader = loader


def ensure_loaded() -> None:
    """Run the host's ``load()`` (a no-op once loaded, unless forced elsewhere)."""
    if _loader is not None:
        _loader()
