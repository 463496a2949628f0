"""The plugin contract of sae-allocators: two hooks, both handed a *registrar* callback.

A plugin is any module (or object) with functions marked ``@hookimpl`` whose names match the
specs below. The project's own architectures are plugins written exactly like a third party's
(see ``sae_allocators/architectures/``). A third-party distribution makes itself known by an
entry point in the group ``sae_allocators`` (see ``docs/plugins.md``)::

    [project.entry-points.sae_allocators]
    nucleus = "sae_allocators_nucleus.plugin"

Plugins never touch SAELens's registry themselves: they call ``register(...)``, and the host
validates, resolves clashes, records who provides each name, and writes SAELens's registries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

PROJECT_NAME = "sae_allocators"
ENTRY_POINT_GROUP = "sae_allocators"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class ArchitectureRegistrar(Protocol):
    """The ``register`` callable handed to :func:`register_architectures`."""

    def __call__(
        self,
        name: str,
        *,
        training: tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig]] | None = None,
        inference: tuple[type[SAE[Any]], type[SAEConfig]] | None = None,
        description: str = "",
    ) -> None:
        """Offer architecture ``name`` to SAELens.

        Args:
            name: the string users write as ``architecture=...`` and that ``cfg.json`` stores.
            training: ``(TrainingSAE subclass, TrainingSAEConfig subclass)``, registered with
                SAELens's ``register_sae_training_class``; the config's ``architecture()`` must
                return ``name``.
            inference: ``(SAE subclass, SAEConfig subclass)``, registered with
                ``register_sae_class``. Give it when a saved file may say
                ``"architecture": name`` (an architecture whose inference model is saved as a
                built-in SAELens one, e.g. ``jumprelu``, may still offer it for batch-mode use).
            description: one line shown by ``sae-allocators list``.
        """


class AuxLossRegistrar(Protocol):
    """The ``register`` callable handed to :func:`register_aux_losses`."""

    def __call__(self, name: str, loss: Any, *, description: str = "") -> None:
        """Offer auxiliary loss ``name`` (the value of a training config's ``aux_loss`` field).

        ``loss`` is an object following :class:`sae_allocators.losses.AuxLoss`: given the SAE, the
        step input and the forward pass tensors it returns a scalar tensor (see that class).
        """


@hookspec
def register_architectures(register: ArchitectureRegistrar) -> None:
    """Register SAE architectures by calling ``register(name, training=..., inference=...)``.

    Called once per plugin when sae-allocators loads (at ``import sae_allocators``, or when
    ``sae_lens`` is imported if the autoload hook is installed). Raising here costs only this
    plugin its registrations: the host warns, naming the plugin's distribution, and goes on.
    """


@hookspec
def register_aux_losses(register: AuxLossRegistrar) -> None:
    """Register auxiliary losses by calling ``register(name, loss)``.

    Every training config of this project accepts ``aux_loss=<name>`` for any registered name.
    """
