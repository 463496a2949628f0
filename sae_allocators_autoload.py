"""Post-import hook: register sae-allocators' architectures when ``sae_lens`` is imported.

Installed together with ``sae_allocators_autoload.pth``, whose single line imports this module at
interpreter start-up. It must stay tiny: it imports nothing but ``os`` and ``sys`` (already loaded
by ``site``), and only adds a finder to ``sys.meta_path``. The finder does nothing until someone
imports ``sae_lens``; then, once SAELens has finished importing, it imports ``sae_allocators``,
which registers every architecture (ours and third-party plugins') into SAELens's registries.

That is what lets a plain ``SAE.load_from_disk(path)`` load a ``top_afa`` SAE in an interpreter
that never imported ``sae_allocators``.

Set ``SAE_ALLOCATORS_NO_AUTOLOAD=1`` to switch it off (then ``import sae_allocators`` yourself).
"""

import os
import sys

ENV_DISABLE = "SAE_ALLOCATORS_NO_AUTOLOAD"
TARGET = "sae_lens"


def _disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


class _LoaderWrapper:
    """Delegates to SAELens's real loader, then runs the registration after the module executed."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # Hand the module back its real loader before anything asks it for resources.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        _register_after_import()


class SaeLensImportHook:
    """A ``sys.meta_path`` finder that fires once, for the top-level ``sae_lens`` package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        uninstall()  # fire once; also keeps the lookup below from recursing into us
        import importlib.util  # only paid for when sae_lens is actually imported

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _LoaderWrapper(spec.loader)
        return spec


_HOOK = SaeLensImportHook()


#: ``"ExcType: message"`` when the registration at ``import sae_lens`` failed (read by the
#: unknown-architecture message), else None
last_error = None


def _register_after_import() -> None:
    global last_error
    try:
        import sae_allocators  # noqa: F401  (importing registers everything)
    except Exception as exc:  # never break `import sae_lens` because of us
        import warnings

        last_error = f"{type(exc).__name__}: {exc}"
        try:  # (under `python -W error` this warning is an exception too: still never break sae_lens)
            warnings.warn(
                f"sae-allocators could not register its architectures when sae_lens was imported: "
                f"{last_error}. SAELens itself works; run `import sae_allocators` "
                f"to see the full error, or set {ENV_DISABLE}=1 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        except Exception:  # noqa: BLE001
            pass


def install() -> bool:
    """Install the hook (idempotent). Returns True when the hook is active or already fired."""
    if _disabled():
        return False
    if TARGET in sys.modules:
        # SAELens was imported before us (e.g. this module imported late): register now.
        _register_after_import()
        return True
    if not any(isinstance(f, SaeLensImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _HOOK)
    return True


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, SaeLensImportHook)]


install()
