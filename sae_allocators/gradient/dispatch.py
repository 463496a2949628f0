"""Let SAELens's own runner pick the activation store a training config asks for.

``LanguageModelSAETrainingRunner.__init__`` (SAELens 6.38 to 6.54) builds its store with
``ActivationsStore.from_config(model, cfg, override_dataset=...)`` and offers no argument, class
attribute or registry to choose another class. :mod:`sae_allocators.patches` wraps that one
classmethod with :func:`dispatching`: when
``cfg.sae`` has an ``activations_store_class()`` classmethod (``gradient_topk``'s config does), the
call is forwarded to ``that_class.from_config``; for every other config it is SAELens's original
method, unchanged. So ``architecture="gradient_topk"`` is the only switch, and everything that
builds its store through ``from_config`` -- the runner, resume from checkpoint, the CLI --
gets the gradient store.

The wrap is installed with the others (``patches.install()``, from ``host.load()`` at ``import
sae_allocators``) and is idempotent; ``patches.uninstall()`` restores SAELens's method.
"""

from __future__ import annotations

from typing import Any

from sae_lens.training.activations_store import ActivationsStore

ATTRIBUTE = "activations_store_class"


def store_class_for(cfg: Any) -> type[ActivationsStore] | None:
    """The store class ``cfg.sae`` asks for, or ``None`` for SAELens's default."""
    getter = getattr(getattr(cfg, "sae", None), ATTRIBUTE, None)
    if getter is None:
        return None
    store_cls = getter() if callable(getter) else getter
    if not (isinstance(store_cls, type) and issubclass(store_cls, ActivationsStore)):
        raise TypeError(
            f"{type(cfg.sae).__name__}.{ATTRIBUTE}() must return an ActivationsStore subclass, got {store_cls!r}"
        )
    return store_cls


def dispatching(original: Any) -> Any:
    """``ActivationsStore.from_config`` (the function under the classmethod) forwarding to the store
    class ``cfg.sae`` names; SAELens's ``original`` for every other config. Installed by
    :mod:`sae_allocators.patches` (3)."""

    def from_config(cls: type[ActivationsStore], model: Any, cfg: Any, *args: Any, **kwargs: Any) -> ActivationsStore:
        target = store_class_for(cfg)
        if target is not None and not issubclass(cls, target):
            return target.from_config(model, cfg, *args, **kwargs)
        return original(cls, model, cfg, *args, **kwargs)

    from_config.__doc__ = original.__doc__
    from_config.__wrapped__ = original  # type: ignore[attr-defined]
    return from_config
