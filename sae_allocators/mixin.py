"""``mix_in``: give one object the methods of a module-level mixin class, in place.

The mechanism of the per-object changes listed in :mod:`sae_allocators.patches` (7-10): SAELens builds
some objects (its trainer, its activation store, the trainer's activation scaler) with no argument to
choose their class; rather than re-binding methods on them, the object becomes an instance of a
module-level subclass of its own class (``class RecordingTrainer(SAETrainer)``, ...). Every use is
listed in that module's table (a test checks it).
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def _mixed_class(mixin: type, base: type) -> type:
    return type(f"{mixin.__name__}[{base.__name__}]", (mixin, base), {"__module__": mixin.__module__})


def mix_in(obj: T, mixin: type, **attributes: Any) -> T:
    """Make ``obj`` an instance of ``mixin``, a module-level subclass of (a class in) ``obj``'s own
    class, and set ``attributes`` on it; returns ``obj`` (the same object: every reference to it sees
    the change). When ``obj``'s class is ``mixin``'s base, ``obj`` simply becomes a ``mixin``; when it
    is a further subclass (a store subclass, an earlier mix-in), a class with both as bases (``mixin``
    first) is made once and cached.

    ``mixin`` adds methods and class-level defaults only (no ``__init__``, no slots): the object keeps
    its state, and its memory layout is its base's, so the class change is allowed. Mixing the same
    mixin in twice only updates the attributes."""
    base = type(obj)
    if not any(b in base.__mro__ for b in mixin.__bases__):
        raise TypeError(f"{mixin.__name__} adapts {mixin.__bases__}, not a {base.__name__}")
    if not isinstance(obj, mixin):
        obj.__class__ = mixin if mixin.__bases__ == (base,) else _mixed_class(mixin, base)
    for name, value in attributes.items():
        setattr(obj, name, value)
    return obj
